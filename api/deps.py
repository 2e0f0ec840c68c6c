"""Dependencies: settings, app state, the current index reader, API-key auth, upload reading.

Tests override `get_settings` (or build the app with `create_app(settings)`) through FastAPI's
dependency_overrides; routes never reach for globals.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Iterator

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from retrieval.api.settings import ApiSettings
from retrieval.api.state import AppState, ReaderHandle

from retrieval.errors import RetrievalError

_bearer = HTTPBearer(auto_error=False, description="Needed when the server runs with RETRIEVAL_API_KEY.")


def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "retrieval", None)
    if state is None or state.handle is None:
        raise RetrievalError("the index is not loaded yet", "unavailable")
    return state


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
StateDep = Annotated[AppState, Depends(get_state)]


def get_reader(state: StateDep) -> Iterator[ReaderHandle]:
    """The reader this request uses from start to end, after picking up a newer index run."""
    state.maybe_reload()
    with state.acquire() as handle:
        yield handle


ReaderDep = Annotated[ReaderHandle, Depends(get_reader)]


# The web UI signs in once (POST /login) and the browser sends the key back as this cookie
# (HttpOnly, SameSite=Strict: other sites can neither read it nor make the browser send it).
SESSION_COOKIE = "retrieval_key"
LOOPBACK = ("127.", "::1", "localhost")


def key_matches(settings: ApiSettings, given: str) -> bool:
    key = settings.api_key
    return key is None or hmac.compare_digest(given.encode(), key.get_secret_value().encode())


def request_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str:
    """The key a request carries: the bearer token, else the web UI's session cookie."""
    if credentials is not None and credentials.scheme.lower() == "bearer":
        return credentials.credentials
    return request.cookies.get(SESSION_COOKIE, "")


def require_api_key(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if settings.api_key is None:
        return
    if not key_matches(settings, request_key(request, credentials)):
        raise RetrievalError("missing or invalid API key", "unauthorized")


Authorized = [Depends(require_api_key)]


def is_loopback(host: str | None) -> bool:
    return bool(host) and str(host).startswith(LOOPBACK)


def require_write_access(request: Request, settings: SettingsDep,
                         credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """For endpoints that change stored state (review decisions).

    With an API key: the key, as for every endpoint. Without one: only on a server listening on
    loopback (the address the request arrived on), so a server exposed to the network never lets
    anyone change decisions unauthenticated. A browser request from another origin is refused.
    """
    require_api_key(request, settings, credentials)
    if settings.api_key is None:
        server = request.scope.get("server") or (None, None)
        if not is_loopback(server[0]):
            raise RetrievalError("this server listens beyond loopback without an API key; set RETRIEVAL_API_KEY "
                                 "to change review decisions", "forbidden")
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host", ""):
        raise RetrievalError("cross-origin request refused", "forbidden")


WriteAuthorized = [Depends(require_write_access)]
