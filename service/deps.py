"""FastAPI dependencies: settings, the engine, API and admin keys, content-type checks.

All are `async def`: FastAPI runs plain `def` dependencies in a thread pool, a thread hop per
dependency per request for work that takes microseconds.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.engine import Engine
from service.errors import Forbidden, Unauthorized, UnsupportedMedia
from service.settings import Settings

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]


def _presented(header: str | None, bearer: HTTPAuthorizationCredentials | None) -> str | None:
    return header or (bearer.credentials if bearer else None)


def _matches(given: str | None, expected: SecretStr) -> bool:
    return given is not None and secrets.compare_digest(
        given.encode(), expected.get_secret_value().encode()
    )


async def require_api_key(
    settings: SettingsDep,
    header: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """When COTS_API_KEY is set: the key as `X-API-Key` or `Authorization: Bearer`."""
    if settings.api_key is None:
        return
    given = _presented(header, bearer)
    if given is None:
        raise Unauthorized("this service needs an API key (X-API-Key header or Bearer token)")
    if not _matches(given, settings.api_key):
        raise Unauthorized("invalid API key")


async def require_admin_key(
    settings: SettingsDep,
    header: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Admin calls always need COTS_ADMIN_KEY; without one configured they are disabled."""
    if settings.admin_key is None:
        raise Forbidden("admin endpoints are disabled (set COTS_ADMIN_KEY to enable them)")
    given = _presented(header, bearer)
    if given is None:
        raise Unauthorized("admin endpoints need the admin key (X-API-Key or Bearer)")
    if not _matches(given, settings.admin_key):
        raise Unauthorized("invalid admin key")


async def require_json(request: Request) -> None:
    """Refuse bodies that are not JSON before FastAPI tries to parse them."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise UnsupportedMedia(
            f"expected Content-Type application/json, got {kind or 'none'}",
            code="wrong_content_type",
        )
