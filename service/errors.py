"""Domain errors of the service and the one place that turns errors into JSON responses."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from index_builder.backends.base import BackendFailed, CorruptIndex

log = logging.getLogger(__name__)
CORRUPT = (
    "the served index version's files changed or were damaged on disk; serve another "
    "version (move CURRENT or /admin/reload); details in the log"
)


class ServiceError(Exception):
    """A request the service refuses, with the HTTP status and a stable machine-readable code."""

    status = 400
    code = "bad_request"

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class InvalidInput(ServiceError):
    status = 422
    code = "invalid_input"


class BadContent(ServiceError):
    """Content that cannot be decoded: malformed base64, a corrupt or truncated image."""

    status = 400
    code = "bad_content"


class TooLarge(ServiceError):
    status = 413
    code = "too_large"


class UnsupportedMedia(ServiceError):
    status = 415
    code = "unsupported_media_type"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    status = 403
    code = "forbidden"


class Conflict(ServiceError):
    status = 409
    code = "conflict"


class BodyTimeout(ServiceError):
    status = 408
    code = "body_timeout"


class NotReady(ServiceError):
    status = 503
    code = "not_ready"


class InsufficientStorage(ServiceError):
    """The index root is full: a change was not made (the served version is intact)."""

    status = 507
    code = "insufficient_storage"


def error_response(
    status: int, detail: str, code: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="cots"'
    if status in (408, 413):  # the rest of the body is unread: the connection cannot be reused
        headers["Connection"] = "close"
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


# An absolute path in a message: from a slash not inside a word, up to a space or quote.
_PATH = re.compile(r"(?<![\w.~-])/[^\s'\":,()]*")


def without_paths(message: str, limit: int = 300) -> str:
    """A library error's message fit for a client: the first line, every absolute path cut to
    its last component (the server's layout stays in the log), at most `limit` characters."""
    line = message.strip().splitlines()[0] if message.strip() else ""
    line = _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


MAX_ERRORS = 5  # validation errors named in one response (the rest are counted)
MAX_DETAIL = 1000  # characters of an error's detail


def _validation_detail(exc: RequestValidationError) -> str:
    """The first MAX_ERRORS errors, each cut short, and how many more: an error body costs
    little whatever the request (a million wrong items once made a 47 MB answer)."""
    errors = exc.errors()
    parts = []
    for err in errors[:MAX_ERRORS]:
        loc = ".".join(str(p)[:40] for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {str(err.get('msg', 'invalid'))[:200]}")
    if len(errors) > MAX_ERRORS:
        parts.append(f"and {len(errors) - MAX_ERRORS} more errors")
    detail = "; ".join(parts)
    return detail if len(detail) <= MAX_DETAIL else detail[: MAX_DETAIL - 3] + "..."


def _validation_code(exc: RequestValidationError) -> str:
    """`invalid_filter` when only the `filter` field is wrong (for example not an object)."""
    fields = {tuple(err.get("loc", ()))[1:2] for err in exc.errors()}
    return "invalid_filter" if fields == {("filter",)} else "invalid_input"


def backend_failure(exc: OSError) -> str:
    """What a client is told of a failed index backend (no server path)."""
    return f"the index backend failed: {without_paths(str(exc))}"


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to `{"detail": ..., "code": ...}`; nothing else reaches a client."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.detail[:MAX_DETAIL], exc.code)

    @app.exception_handler(CorruptIndex)
    async def _corrupt(request: Request, exc: CorruptIndex) -> JSONResponse:
        log.error("the served index version is damaged: %s", exc)
        return error_response(503, CORRUPT, "index_corrupt")

    @app.exception_handler(BackendFailed)
    async def _backend_failed(request: Request, exc: BackendFailed) -> JSONResponse:
        """Any index backend failure a route meets outside `engine.backend_errors` (a
        lookup while shaping hits, a video's keyframes) is a 503 as well, never a 500."""
        log.error("the index backend failed: %s", exc)
        return error_response(503, backend_failure(exc), "backend_unavailable")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            return error_response(400, "the request body is not valid JSON", "malformed_json")
        return error_response(422, _validation_detail(exc), _validation_code(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "http")
        return error_response(exc.status_code, str(exc.detail), code, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error (logged on the server)", "internal")
