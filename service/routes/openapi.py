"""What the OpenAPI document says beyond the models: the errors each route may answer, the
request bodies of routes that read their own (generated from their `RequestBody`), and the
routers every resource starts from."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.routing import APIRoute

from service.deps import RequestBody, require_admin_key, require_api_key
from service.schemas import ErrorBody

ERROR_TEXT = {
    400: "undecodable input (malformed or too deeply nested JSON, malformed base64, corrupt image)",
    401: "missing or wrong key",
    403: "admin endpoints are disabled (no admin key is configured)",
    404: "an unknown id, a search of a side this index does not hold, or no such gallery "
    "image or index version",
    408: "the request body stalled for longer than the read timeout",
    409: "the index version was refused (built with another bundle, or unreadable); the old "
    "one keeps serving",
    413: "an image or the request is over the size or pixel limit",
    415: "wrong Content-Type, or an upload that is not an image",
    422: "invalid request (empty or long text, k or offset out of range, batch over the limit, "
    "an image too thin, a malformed version name...)",
    503: "the bundle and index are still loading, or failed to load (retried), or the index "
    "backend or root cannot be read or written",
    507: "the index root is full: the change was not made (the served version is intact)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The documented error answers: each an `ErrorBody`, with what it means here."""
    return {status: {"model": ErrorBody, "description": ERROR_TEXT[status]} for status in statuses}


SEARCH_ERRORS = error_responses(400, 404, 408, 413, 415, 422, 503)
CHANGE_ERRORS = error_responses(400, 404, 408, 409, 413, 415, 422, 503, 507)


class BodyRoute(APIRoute):
    """A route whose OpenAPI request body is generated from its `RequestBody` dependency
    (a route reading its own body declares no body parameter for FastAPI to document)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **options: Any) -> None:
        super().__init__(path, endpoint, **options)
        for dependency in self.dependant.dependencies:
            if isinstance(dependency.call, RequestBody):
                self.openapi_extra = {**(self.openapi_extra or {}), **dependency.call.openapi()}


def api_router(**options: Any) -> APIRouter:
    """A router whose routes need the API key (when the service has one).

    422 is documented on every route: FastAPI would otherwise add its own
    HTTPValidationError, a body this service never sends (every error is an ErrorBody)."""
    return APIRouter(
        dependencies=[Depends(require_api_key)],
        responses=error_responses(401, 422),
        route_class=BodyRoute,
        **options,
    )


def admin_router() -> APIRouter:
    """The router of the admin routes (always the admin key; disabled without one)."""
    return APIRouter(
        prefix="/admin",
        dependencies=[Depends(require_admin_key)],
        responses=error_responses(401, 403, 422),
        route_class=BodyRoute,
    )
