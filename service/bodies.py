"""Reading requests: bodies under a byte limit, JSON parsed (off the loop when large) and
validated like FastAPI's own bodies, form fields, image search and clip uploads, text checks."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from index_builder.video import VideoLimits
from service.errors import BadContent, InvalidInput, TooLarge, UnsupportedMedia
from service.forms import CLIP_FIELDS, IMAGE_FIELDS
from service.images import decode_base64
from service.schemas import ImageQuery
from service.settings import Settings

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ImageSearch:
    """An image search request: uploaded images (names and bytes) or the `id` of an indexed
    item ('more like this'), the page and a metadata filter."""

    names: list[str]
    payloads: list[bytes]
    k: int | None
    offset: int
    filter: dict[str, Any] | None = None
    id: str | None = None


def check_batch(count: int, name: str, settings: Settings) -> None:
    if count == 0:
        raise InvalidInput(f"{name}: the list is empty")
    if count > settings.max_batch:
        raise InvalidInput(
            f"{name}: {count} queries is over the limit of {settings.max_batch} per request",
            "batch_too_large",
        )


def request_kind(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_json(kind: str) -> bool:
    return kind == "application/json" or kind.endswith("+json")


def require_json(request: Request) -> None:
    """Refuse a body that is not JSON (415) before reading it."""
    kind = request_kind(request)
    if not is_json(kind):
        raise UnsupportedMedia(
            f"expected Content-Type application/json, got {kind or 'none'}",
            code="wrong_content_type",
        )


async def read_model(
    request: Request,
    model: type[M],
    limit: int,
    max_values: int | None = None,
    max_items: int | None = None,
) -> M:
    """A JSON body (its Content-Type checked first) read within `limit` bytes, parsed and
    validated into `model` (`read_json`, `validate`)."""
    require_json(request)
    return validate(model, await read_json(request, limit, max_values), max_items)


async def read_image_search(
    request: Request, settings: Settings, model: type[ImageQuery] = ImageQuery
) -> ImageSearch:
    """Multipart (`image` files, `k`, `offset`, `filter` as JSON text) or JSON `model`."""
    kind = request_kind(request)
    if kind == "multipart/form-data":
        return await _read_multipart(request, settings)
    if is_json(kind):
        return await _read_json_images(request, settings, model)
    raise UnsupportedMedia(
        f"expected multipart/form-data or application/json, got {kind or 'none'}",
        "wrong_content_type",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes. Routes read their
    own bodies so that the key (a dependency) is checked before any of it is read."""
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and (len(length) > 18 or int(length) > limit):
        raise TooLarge(f"request body over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise BadContent("the request body is nested too deeply", "malformed_json") from None
    except ValueError:  # JSONDecodeError, bad UTF-8, an integer of over 4300 digits
        raise BadContent("the request body is not valid JSON", "malformed_json") from None


def parse_json_field(value: Any, name: str, code: str = "invalid_input") -> Any:
    """A form field holding JSON text; malformed or too deeply nested JSON is a 422."""
    if not isinstance(value, str):
        raise InvalidInput(f"{name}: expected a JSON text field", code)
    try:
        return json.loads(value)
    except RecursionError:
        raise InvalidInput(f"{name}: nested too deeply", code) from None
    except ValueError:
        raise InvalidInput(f"{name}: not valid JSON", code) from None


_OFF_LOOP_BYTES = 1 << 16  # larger bodies are parsed in a worker thread, not on the loop


# A search holds at most a batch of items, a filter of a few fields and 1024 values per `in`:
# a body with more commas than this is refused unparsed, since parsing a million small values
# holds the GIL for tens of milliseconds (off the loop or not) and /health waits as long.
MAX_SEARCH_VALUES = 1 << 16


def text_limit(settings: Settings) -> int:
    """The byte limit of a text search's body (COTS_MAX_TEXT_BODY_BYTES)."""
    return settings.max_text_body_bytes


async def read_json(request: Request, limit: int, max_values: int | None = None) -> Any:
    """The request body as JSON, read up to `limit` bytes (a large one parsed off the event
    loop: /health must not wait for it); with `max_values`, a body with that many commas or
    more is a 422 before it is parsed."""
    body = await read_body(request, limit)
    if max_values is not None and len(body) > max_values and body.count(b",") >= max_values:
        raise InvalidInput(
            f"the request body holds {max_values} values or more; a search takes at most a "
            "batch of items",
            "batch_too_large",
        )
    if len(body) > _OFF_LOOP_BYTES:
        return await run_in_threadpool(parse_json, body)
    return parse_json(body)


def check_counts(body: Any, limit: int, keys: tuple[str, ...] = ("images", "texts")) -> None:
    """Refuse a top-level list longer than `limit` before any validation runs: the cost of
    a request (and of its error) stays bounded whatever it holds."""
    if not isinstance(body, dict):
        return
    for key in keys:
        value = body.get(key)
        if isinstance(value, list) and len(value) > limit:
            raise InvalidInput(
                f"{key}: {len(value)} items is over the limit of {limit} per request",
                "batch_too_large",
            )


def validate(model: type[M], body: Any, limit: int | None = None) -> M:
    """`model` from a parsed body (its lists at most `limit` long); errors read like
    FastAPI's own body validation."""
    if limit is not None:
        check_counts(body, limit)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]
        ) from None


async def _read_json_images(
    request: Request, settings: Settings, model: type[ImageQuery]
) -> ImageSearch:
    body = await read_json(request, settings.max_body_bytes, MAX_SEARCH_VALUES)
    query = validate(model, body, settings.max_batch)
    item_id = getattr(query, "id", None)  # ImageToImageQuery's
    if item_id is not None:
        return ImageSearch([], [], query.k, query.offset, query.filter, item_id)
    single = query.image is not None
    encoded = [query.image] if query.image is not None else list(query.images or [])
    check_batch(len(encoded), "images", settings)
    names = ["image"] if single else [f"images[{i}]" for i in range(len(encoded))]
    payloads = [
        decode_base64(text, settings.max_image_bytes, name)
        for name, text in zip(names, encoded, strict=True)
    ]
    return ImageSearch(names, payloads, query.k, query.offset, query.filter)


_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")  # ASCII digits only: int() reads '٣' too


def form_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _INTEGER.fullmatch(value.strip()):
        raise InvalidInput(f"{name}: expected an integer, got {str(value)[:40]!r}")
    return int(value)


def parse_filter(value: Any) -> dict[str, Any] | None:
    """A `filter` form field: a JSON object (or empty: none)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parsed = parse_json_field(value, "filter", "invalid_filter")
    if not isinstance(parsed, dict):
        raise InvalidInput("filter: expected a JSON object", "invalid_filter")
    return parsed


async def _read_multipart(request: Request, settings: Settings) -> ImageSearch:
    form = await request.form(max_files=settings.max_batch + 1, max_fields=8)
    unknown = set(form.keys()) - IMAGE_FIELDS
    if unknown & {"text", "texts"}:
        raise InvalidInput(
            "send either text or an image, not both: text queries go to /search/text-to-image "
            "or /search/text-to-text",
            "text_and_image",
        )
    if unknown:
        raise InvalidInput(
            f"unexpected form fields {sorted(unknown)} (use 'image', 'k', 'offset', 'filter')"
        )
    uploads = form.getlist("image") + form.getlist("images")
    if any(not isinstance(item, UploadFile) for item in uploads):
        raise InvalidInput("image: expected a file upload, got a plain form field")
    check_batch(len(uploads), "image", settings)
    names, payloads = [], []
    for i, upload in enumerate(uploads):
        assert isinstance(upload, UploadFile)
        names.append(upload.filename or f"image[{i}]")
        payloads.append(await upload.read(settings.max_image_bytes + 1))
    offset = form_int(form.get("offset"), "offset")
    return ImageSearch(
        names,
        payloads,
        form_int(form.get("k"), "k"),
        0 if offset is None else offset,
        parse_filter(form.get("filter")),
    )


def check_texts(texts: Sequence[str], single: bool, settings: Settings) -> None:
    """Query texts: a batch within the limit, none empty, too long or not valid Unicode."""
    check_batch(len(texts), "texts", settings)
    for i, text in enumerate(texts):
        label = "text" if single else f"texts[{i}]"
        if not text.strip():
            raise InvalidInput(f"{label}: must not be empty", "empty_text")
        if len(text) > settings.max_text_chars:
            raise InvalidInput(
                f"{label}: {len(text)} characters is over the limit of {settings.max_text_chars}",
                "text_too_long",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(f"{label}: not valid Unicode (lone surrogate)") from None


@dataclass(frozen=True)
class Clip:
    """A video-to-text request: the uploaded clip (its name and bytes) and the page."""

    name: str
    data: bytes
    k: int | None
    offset: int
    filter: dict[str, Any] | None


async def read_clip(request: Request, limits: VideoLimits) -> Clip:
    """The multipart `video` file (name, bytes) and the `k`, `offset`, `filter` fields."""
    kind = request_kind(request)
    if kind != "multipart/form-data":
        raise UnsupportedMedia(
            f"expected multipart/form-data with a 'video' file, got {kind or 'none'}",
            "wrong_content_type",
        )
    form = await request.form(max_files=2, max_fields=8)
    unknown = set(form.keys()) - CLIP_FIELDS
    if unknown:
        raise InvalidInput(
            f"unexpected form fields {sorted(unknown)} (use 'video', 'k', 'offset', 'filter')"
        )
    uploads = form.getlist("video")
    if len(uploads) != 1 or not isinstance(uploads[0], UploadFile):
        raise InvalidInput("video: expected exactly one file upload", "video_missing")
    upload = uploads[0]
    data = await upload.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise TooLarge(f"video: over the limit of {limits.max_bytes} bytes", "video_too_large")
    offset = form_int(form.get("offset"), "offset")
    return Clip(
        upload.filename or "video",
        data,
        form_int(form.get("k"), "k"),
        0 if offset is None else offset,
        parse_filter(form.get("filter")),
    )
