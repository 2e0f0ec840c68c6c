"""Every error a client sees is JSON of one shape, `{"detail": str}` (plus `errors` for a malformed request).

This is the one place where errors become HTTP answers: a RetrievalError's `kind` picks the status
(KIND_STATUS), its message is the stable `detail`; decode failures get a fixed detail per failure
kind, the same for uploads and thumbnails; no traceback or server path leaks. Also the request
body limit: a pure ASGI middleware that answers 413 as soon as a body (declared or streamed) grows
past the upload cap, before the rest is read.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.errors import ImageDecodeError, RetrievalError

logger = logging.getLogger("api")

# multipart framing (boundaries, part headers) on top of the file itself
MULTIPART_OVERHEAD = 64 * 1024

KIND_STATUS = {
    "invalid": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "unsupported_media": 415,
    "unprocessable": 422,
    "unavailable": 503,
    "timeout": 504,
}

# What a client reads for an image that does not decode (the recorded reason may name internals).
DECODE_DETAILS = {
    "not_an_image": "not an image: the upload is in no image format the server can read",
    "too_large": "image has too many pixels (decompression bomb guard)",
    "truncated": "truncated image: the data ends early",
    "empty": "empty upload: send the image bytes",
    "corrupt": "corrupt image: the data cannot be decoded",
}
UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}


def error_status(exc: RetrievalError) -> int:
    return KIND_STATUS.get(exc.kind, 400)


def public_detail(exc: RetrievalError) -> str:
    if isinstance(exc, ImageDecodeError):
        return DECODE_DETAILS.get(exc.failure_kind, DECODE_DETAILS["corrupt"])
    return str(exc)


def validation_detail(errors: list[dict[str, Any]]) -> str:
    """One line naming the first bad field, e.g. "invalid request: query.k: Input should be ..."."""
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"invalid request: {where}: {first['msg']}" if where else f"invalid request: {first['msg']}"


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first route's)."""
    routes = request.app.router.routes
    return [method for method in HTTP_METHODS
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]


class SignInRequired(Exception):
    """A web page asked for without the API key: the person is sent to the sign-in form."""

    def __init__(self, location: str):
        super().__init__(location)
        self.location = location


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SignInRequired)
    async def sign_in(_: Request, exc: SignInRequired) -> Response:
        return Response(status_code=303, headers={"Location": exc.location})

    @app.exception_handler(RetrievalError)
    async def retrieval_error(_: Request, exc: RetrievalError) -> JSONResponse:
        status = error_status(exc)
        return JSONResponse({"detail": public_detail(exc)}, status_code=status,
                            headers=UNAUTHORIZED_HEADERS if status == 401 else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # the framework's own answers: unknown route (404), method not allowed (405)
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # loc/msg/type only: no echo of the input (which may be a large upload) and no ctx objects
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        return JSONResponse({"detail": validation_detail(errors), "errors": errors}, status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _: ClientDisconnect) -> Response:
        # Nobody is left to read an answer; this is the client's choice, not a server error.
        logger.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error"}, status_code=500)


class _TooLarge(Exception):
    pass


def _json_response(status: int, detail: str) -> tuple[Message, Message]:
    body = json.dumps({"detail": detail}).encode()
    return (
        {"type": "http.response.start", "status": status,
         "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]},
        {"type": "http.response.body", "body": body},
    )


class BodyLimitMiddleware:
    """413 for request bodies larger than `max_bytes` (+ multipart overhead), declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.limit = max_bytes + MULTIPART_OVERHEAD

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        detail = f"upload too large: the limit is {self.max_bytes} bytes"
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                for message in _json_response(413, detail):
                    await send(message)
                return
        state: dict[str, Any] = {"received": 0, "exceeded": False, "started": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.limit:
                    state["exceeded"] = True
                    raise _TooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            if state["exceeded"]:
                # whatever the app made of the aborted body (a parse error, usually) becomes a 413
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    for reply in _json_response(413, detail):
                        await send(reply)
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:  # _TooLarge, possibly wrapped in an ExceptionGroup by an inner middleware
            if not state["exceeded"]:
                raise
            if not state["started"]:
                state["started"] = True
                for reply in _json_response(413, detail):
                    await send(reply)
