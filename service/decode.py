"""Untrusted input: image search requests (multipart or JSON base64) read into bytes; base64,
byte, pixel and shape limits checked before decoding, safe formats; metadata filters."""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from index_builder.filters import check_storable, show
from index_builder.preprocess import (
    ImageSpec,
    check_aspect_ratio,
    load_image,
    load_image_for,
    preprocess_image,
)
from service.errors import BadContent, InvalidInput, TooLarge, UnsupportedMedia
from service.metrics import Metrics
from service.schemas import AddItems, ImageQuery, TextItem
from service.settings import Settings

# Formats decoded by Pillow itself; EPS (Ghostscript) and friends are never opened.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
EXTENSIONS = {
    "PNG": "png",
    "JPEG": "jpg",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
}
_DATA_URL = re.compile(r"^data:([^;,]*)(;[^,]*)?,", re.IGNORECASE)


def decode_base64(text: str, max_bytes: int, label: str) -> bytes:
    """Plain base64 or a `data:image/...;base64,` URL -> bytes (size checked before decoding)."""
    match = _DATA_URL.match(text)
    if match:
        if not (match.group(2) or "").lower().endswith(";base64"):
            raise BadContent(f"{label}: a data URL must be base64-encoded (';base64,')")
        mime = match.group(1).lower()
        if mime and not mime.startswith("image/"):
            raise UnsupportedMedia(f"{label}: data URL type {mime!r} is not an image")
        text = text[match.end() :]
    text = "".join(text.split())
    if len(text) * 3 // 4 > max_bytes:
        raise TooLarge(f"{label}: the image is larger than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadContent(f"{label}: malformed base64") from None
    if not data:
        raise InvalidInput(f"{label}: the image is empty")
    return data


def check_image(
    data: bytes, max_bytes: int, max_pixels: int, max_aspect_ratio: float, label: str
) -> str:
    """Read only the header: refuse non-images, unsafe formats, oversized dimensions and
    extreme shapes; returns the format ("PNG", "JPEG"...)."""
    if not data:
        raise InvalidInput(f"{label}: the image is empty")
    if len(data) > max_bytes:
        raise TooLarge(f"{label}: {len(data)} bytes is over the limit of {max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
            width, height = probe.size
            fmt = str(probe.format)
    except Image.DecompressionBombError:
        raise TooLarge(
            f"{label}: the image has too many pixels (limit {max_pixels})", code="too_many_pixels"
        ) from None
    except UnidentifiedImageError:
        raise UnsupportedMedia(
            f"{label}: not an image in a supported format ({', '.join(FORMATS)})",
            code="not_an_image",
        ) from None
    except (OSError, SyntaxError, ValueError):
        raise BadContent(f"{label}: corrupt image header") from None
    if width * height > max_pixels:
        raise TooLarge(
            f"{label}: {width}x{height} is over the limit of {max_pixels} pixels",
            code="too_many_pixels",
        )
    try:
        check_aspect_ratio(width, height, max_aspect_ratio)
    except ValueError as exc:
        raise InvalidInput(f"{label}: {exc}", "extreme_aspect_ratio") from None
    return fmt


def image_to_pixels(
    data: bytes,
    spec: ImageSpec,
    max_bytes: int,
    max_pixels: int,
    max_aspect_ratio: float,
    label: str,
) -> np.ndarray:
    """Checked bytes -> (3, S, S) float32 with the bundle's preprocessing."""
    check_image(data, max_bytes, max_pixels, max_aspect_ratio, label)
    try:
        image = load_image_for(data, spec, max_aspect_ratio)
    except ValueError:
        raise BadContent(f"{label}: the image data is truncated or corrupt") from None
    pixels = preprocess_image(image, spec)
    image.close()
    release_after(image)
    return pixels


def images_to_pixels(
    names: list[str], payloads: list[bytes], spec: ImageSpec, settings: Settings, metrics: Metrics
) -> list[np.ndarray]:
    """Each upload checked and preprocessed with `spec` (the bundle that will encode it)."""
    pixels = []
    for name, data in zip(names, payloads, strict=True):
        with metrics.timed("decode", "image"):
            pixels.append(
                image_to_pixels(
                    data,
                    spec,
                    settings.max_image_bytes,
                    settings.max_image_pixels,
                    settings.max_aspect_ratio,
                    name,
                )
            )
    return pixels


LARGE_DECODE_PIXELS = 4_000_000  # decoded, about 50 MB with Pillow's and our copies


def decodes_large(payloads: list[bytes]) -> bool:
    """Whether an upload decodes to LARGE_DECODE_PIXELS or more, read from its header (a
    JPEG decodes at a reduced scale, so never does). Such decodes run in the bounded decode
    pool: sixteen maximum-size PNGs decoded at once held 3.9 GB and stalled the event loop
    (bench/attack.py). An unreadable header is not large: the checks that follow refuse it."""
    for data in payloads:
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
                width, height = probe.size
                if probe.format != "JPEG" and width * height >= LARGE_DECODE_PIXELS:
                    return True
        except (
            Image.DecompressionBombError,
            UnidentifiedImageError,
            OSError,
            SyntaxError,
            ValueError,
        ):
            continue
    return False


def release_after(image: Image.Image) -> None:
    """Give the heap back to the system after a large decode: glibc keeps the freed memory,
    so the resident size after the largest allowed image (+490 MB) never came back down."""
    if image.width * image.height >= LARGE_DECODE_PIXELS:
        release_memory()


def release_memory() -> None:
    """`malloc_trim(0)` where the C library has it (glibc); elsewhere nothing."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


# -- search requests -------------------------------------------------------------------------


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


def validate(model: type[Any], body: Any, limit: int | None = None) -> Any:
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
    if getattr(query, "id", None) is not None:
        return ImageSearch([], [], query.k, query.offset, query.filter, query.id)
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
    unknown = set(form.keys()) - {"image", "images", "k", "offset", "filter"}
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


# -- admin uploads ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """An image to add: its id, bytes and metadata."""

    id: str
    data: bytes
    meta: dict[str, Any]


@dataclass(frozen=True)
class Items:
    """What an add request carries: images (bytes, checked later) and texts."""

    images: list[Upload]
    texts: list[TextItem]
    upsert: bool


async def read_items(request: Request, settings: Settings) -> Items:
    """JSON `AddItems` (images base64), or multipart: `image` files with optional `ids` (a JSON
    list, default: the file names without extension), `meta` (a JSON object for every file or
    a list, one per file) and `upsert` (true/false)."""
    kind = request_kind(request)
    if kind == "multipart/form-data":
        items = await _read_item_form(request, settings)
    elif is_json(kind):
        body: AddItems = validate(
            AddItems, await read_json(request, settings.max_body_bytes), settings.max_admin_items
        )
        images = [
            Upload(
                item.id,
                decode_base64(item.image, settings.max_image_bytes, f"images[{i}]"),
                item.meta,
            )
            for i, item in enumerate(body.images)
        ]
        items = Items(images, body.texts, body.upsert)
    else:
        raise UnsupportedMedia(
            f"expected multipart/form-data or application/json, got {kind or 'none'}",
            "wrong_content_type",
        )
    _check_items(items, settings)
    return items


def _check_items(items: Items, settings: Settings) -> None:
    count = len(items.images) + len(items.texts)
    if count == 0:
        raise InvalidInput("nothing to add: give images or texts", "empty")
    if count > settings.max_admin_items:
        raise InvalidInput(
            f"{count} items is over the limit of {settings.max_admin_items} per request",
            "batch_too_large",
        )
    for side, ids in (
        ("images", [i.id for i in items.images]),
        ("texts", [t.id for t in items.texts]),
    ):
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)  # linear, not n^2
        if repeated:
            shown = [show(i) for i in repeated[:10]]
            raise InvalidInput(f"{side}: repeated ids {shown}", "duplicate_ids")
    # Everything the new version will store, checked before any file is written: a value
    # the index cannot store or filter on once took the service down (issue 25).
    try:
        for i, upload in enumerate(items.images):
            check_storable({"id": upload.id, "meta": upload.meta}, f"images[{i}]")
        for i, text in enumerate(items.texts):
            check_storable(text.model_dump(), f"texts[{i}]")
    except ValueError as exc:
        raise InvalidInput(str(exc), "unstorable_value") from None


def _json_field(value: Any, name: str) -> Any:
    return parse_json_field(value, name)


async def _read_item_form(request: Request, settings: Settings) -> Items:
    form = await request.form(max_files=settings.max_admin_items + 1, max_fields=8)
    unknown = set(form.keys()) - {"image", "ids", "meta", "upsert"}
    if unknown:
        raise InvalidInput(
            f"unexpected form fields {sorted(unknown)} (use 'image', 'ids', 'meta', 'upsert')"
        )
    uploads = form.getlist("image")
    if any(not isinstance(item, UploadFile) for item in uploads):
        raise InvalidInput("image: expected a file upload, got a plain form field")
    files = [item for item in uploads if isinstance(item, UploadFile)]
    ids = _form_ids(form.get("ids"), files)
    metas = _form_metas(form.get("meta"), len(files))
    upsert = form.get("upsert", "false")
    if upsert not in ("true", "false"):
        raise InvalidInput(f"upsert: expected true or false, got {str(upsert)[:20]!r}")
    images = [
        Upload(item_id, await upload.read(settings.max_image_bytes + 1), meta)
        for item_id, upload, meta in zip(ids, files, metas, strict=True)
    ]
    return Items(images, [], upsert == "true")


def _form_ids(value: Any, files: list[UploadFile]) -> list[str]:
    if value is None:
        names = [Path(upload.filename or "").stem for upload in files]
        if not all(names):
            raise InvalidInput("ids: needed when an uploaded file has no name")
        return names
    ids = _json_field(value, "ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise InvalidInput("ids: expected a JSON list of non-empty strings")
    if len(ids) != len(files):
        raise InvalidInput(f"ids: {len(ids)} ids for {len(files)} files")
    return ids


def _form_metas(value: Any, count: int) -> list[dict[str, Any]]:
    if value is None:
        return [{} for _ in range(count)]
    meta = _json_field(value, "meta")
    if isinstance(meta, dict):
        return [dict(meta) for _ in range(count)]
    if not isinstance(meta, list) or not all(isinstance(m, dict) for m in meta):
        raise InvalidInput("meta: expected a JSON object (for every file) or a list of objects")
    if len(meta) != count:
        raise InvalidInput(f"meta: {len(meta)} objects for {count} files")
    return meta


def check_upload(upload: Upload, settings: Settings) -> str:
    """Decode an uploaded image fully (a truncated file is refused here, not in the index
    build); returns the file extension of its format."""
    label = f"image {upload.id!r}"
    fmt = check_image(
        upload.data,
        settings.max_image_bytes,
        settings.max_image_pixels,
        settings.max_aspect_ratio,
        label,
    )
    try:
        image = load_image(upload.data)
    except ValueError:
        raise BadContent(f"{label}: the image data is truncated or corrupt") from None
    image.close()
    release_after(image)
    return EXTENSIONS[fmt]
