"""FastAPI dependencies: settings, the engine, API and admin keys, typed request bodies.

All are `async def`: FastAPI runs plain `def` dependencies in a thread pool, a thread hop per
dependency per request for work that takes microseconds.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, SecretStr

from index_builder.search import Searcher
from service.bodies import M, read_model
from service.engine import Engine
from service.errors import Forbidden, Unauthorized
from service.settings import Settings

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]


async def served_searcher(engine: EngineDep) -> Searcher:
    """The searcher served now (503 while loading): routes that take large bodies ask for it
    before the body, so a service that cannot answer reads none."""
    return engine.current()


ServedSearcher = Annotated[Searcher, Depends(served_searcher)]


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


ApiKey = Annotated[None, Depends(require_api_key)]
AdminKey = Annotated[None, Depends(require_admin_key)]
T = TypeVar("T")
Reader = Callable[[Request, Settings], Awaitable[T]]


class RequestBody(Generic[T]):
    """A route's request body as one typed dependency: the key checked first (a
    sub-dependency: FastAPI runs it once per request, before `read`), then `read` (the body
    read within its size limit and parsed into its model; every refusal a 4xx `ApiError` or
    FastAPI's 422), and the route's OpenAPI request body generated from `content` (media type
    -> the model of that body) by `routes.openapi.BodyRoute`. Routes read their own bodies
    this way, not through FastAPI's, so that no byte is read before the key is checked."""

    def __init__(
        self, read: Reader[T], content: dict[str, type[BaseModel]], required: bool = True
    ) -> None:
        self.read = read
        self.content = content
        self.required = required

    async def __call__(self, request: Request, settings: SettingsDep, _: ApiKey) -> T:
        return await self.read(request, settings)

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI `requestBody` of a route reading this body."""
        content = {
            media: {"schema": model.model_json_schema()} for media, model in self.content.items()
        }
        return {"requestBody": {"required": self.required, "content": content}}


class AdminBody(RequestBody[T]):
    """A request body of an admin route: the admin key checked first."""

    async def __call__(self, request: Request, settings: SettingsDep, _: AdminKey) -> T:
        return await self.read(request, settings)


def json_body(
    model: type[M],
    limit: Callable[[Settings], int],
    max_values: int | None = None,
    batch: bool = False,
    admin: bool = False,
) -> RequestBody[M]:
    """A JSON body of `model` (Content-Type checked, then read within `limit(settings)`
    bytes, then validated; with `batch`, its lists at most `max_batch` long; with
    `max_values`, `read_json`'s bound on values)."""

    async def read(request: Request, settings: Settings) -> M:
        max_items = settings.max_batch if batch else None
        return await read_model(request, model, limit(settings), max_values, max_items)

    kind = AdminBody if admin else RequestBody
    return kind(read, {"application/json": model})
