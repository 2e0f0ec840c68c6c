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


def require_api_key(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    key = settings.api_key
    if key is None:
        return
    given = credentials.credentials if credentials is not None and credentials.scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise RetrievalError("missing or invalid API key", "unauthorized")


Authorized = [Depends(require_api_key)]
