"""The HTTP routes: thin handlers that validate, hand queries to the engine and shape hits."""

from __future__ import annotations

import json
import mimetypes
import re
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.decode import decode_base64, image_to_pixels
from service.deps import EngineDep, SettingsDep, require_admin_key, require_api_key, require_json
from service.engine import Engine, Gallery, Hit
from service.errors import BadContent, InvalidInput, NotFound, NotReady, TooLarge, UnsupportedMedia
from service.schemas import (
    CaptionHit,
    CaptionResults,
    ErrorBody,
    ImageHit,
    ImageQuery,
    ImageResults,
    ImageToTextResponse,
    Info,
    ReloadRequest,
    ReloadResponse,
    Status,
    TextQuery,
    TextToImageResponse,
)
from service.settings import Settings

THUMBNAIL_SIZE = 256
RELOAD_BODY_BYTES = 16384
_ERROR_TEXT = {
    400: "undecodable input (malformed or too deeply nested JSON, malformed base64, corrupt image)",
    401: "missing or wrong key",
    403: "admin endpoints are disabled (no admin key is configured)",
    404: "no such gallery image or index version",
    408: "the request body stalled for longer than the read timeout",
    409: "the index version was refused (built with another bundle, or unreadable); the old "
    "one keeps serving",
    413: "an image or the request is over the size or pixel limit",
    415: "wrong Content-Type, or an upload that is not an image",
    422: "invalid request (empty or long text, k or offset out of range, batch over the limit, "
    "an image too thin, a malformed version name...)",
    503: "the bundle and index are still loading, or failed to load (retried)",
}
M = TypeVar("M", bound=BaseModel)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": _ERROR_TEXT[status]} for status in statuses}


def _json_body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads and validates its JSON itself."""
    schema = {"application/json": {"schema": model.model_json_schema()}}
    return {"requestBody": {"required": required, "content": schema}}


public = APIRouter()
api = APIRouter(dependencies=[Depends(require_api_key)], responses=_errors(401))
admin = APIRouter(
    prefix="/admin", dependencies=[Depends(require_admin_key)], responses=_errors(401, 403)
)
_SEARCH_ERRORS = _errors(400, 408, 413, 415, 422, 503)


# -- liveness and readiness (no key: probes must reach them) --------------------------------


@public.get("/health", response_model=Status, tags=["status"])
async def health() -> Status:
    """The process is alive (it may still be loading)."""
    return Status(status="ok")


@public.get("/ready", response_model=Status, tags=["status"], responses=_errors(503))
async def ready(engine: EngineDep) -> Status:
    """200 once the bundle and an index are loaded; 503 before, with code `not_ready` while
    loading and `load_failed` after a failed load (retried; the details are in the log)."""
    engine.current()
    return Status(status="ready")


# -- search ---------------------------------------------------------------------------------


def _page(k: int | None, offset: int, settings: Settings) -> tuple[int, int]:
    k = min(settings.default_k, settings.max_k) if k is None else k
    if not 1 <= k <= settings.max_k:
        raise InvalidInput(
            f"k: {k} is out of range (1 to max_k={settings.max_k})", "k_out_of_range"
        )
    if not 0 <= offset <= settings.max_offset:
        raise InvalidInput(
            f"offset: {offset} is out of range (0 to max_offset={settings.max_offset})",
            "offset_out_of_range",
        )
    return k, offset


def _check_batch(count: int, name: str, settings: Settings) -> None:
    if count == 0:
        raise InvalidInput(f"{name}: the list is empty")
    if count > settings.max_batch:
        raise InvalidInput(
            f"{name}: {count} queries is over the limit of {settings.max_batch} per request",
            "batch_too_large",
        )


def _check_texts(texts: Sequence[str], single: bool, settings: Settings) -> None:
    _check_batch(len(texts), "texts", settings)
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


def _urls(request: Request, image_id: str) -> tuple[str, str]:
    url = f"{request.scope.get('root_path', '')}/images/{quote(image_id, safe='')}"
    return url, f"{url}?size={THUMBNAIL_SIZE}"


def _image_hit(request: Request, gallery: Gallery, hit: Hit, rank: int) -> ImageHit:
    row = gallery.index.images[hit.row]
    url, thumb = _urls(request, str(row["id"]))
    return ImageHit(
        id=str(row["id"]),
        score=hit.score,
        rank=rank,
        captions=list(row.get("captions", [])),
        image=str(row["image"]),
        url=url,
        thumbnail_url=thumb,
    )


def _caption_hit(request: Request, gallery: Gallery, hit: Hit, rank: int) -> CaptionHit:
    row = gallery.index.texts[hit.row]
    image_id = str(row["image_id"])
    image_row = gallery.image_rows.get(image_id)
    image = str(gallery.index.images[image_row]["image"]) if image_row is not None else ""
    url, thumb = _urls(request, image_id)
    return CaptionHit(
        id=str(row["id"]),
        score=hit.score,
        rank=rank,
        text=str(row["text"]),
        image_id=image_id,
        image=image,
        url=url,
        thumbnail_url=thumb,
    )


def _took_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


_SHAPES: dict[str, tuple[Callable[[Request, Gallery, Hit, int], Any], type[BaseModel]]] = {
    "text": (_image_hit, ImageResults),
    "image": (_caption_hit, CaptionResults),
}


async def _search(
    request: Request,
    engine: Engine,
    modality: str,
    labels: list[str],
    queries: list[Any],
    k: int,
    offset: int,
    gallery: Gallery | None = None,
) -> dict[str, Any]:
    """Search one page deep and shape it: per-query results, `hits` the first's, the envelope
    (the bundle and index version are those of the gallery the request was served with)."""
    gallery, found = await engine.search(modality, queries, k + offset, gallery)
    make_hit, group = _SHAPES[modality]
    pages = [
        [
            make_hit(request, gallery, hit, offset + rank)
            for rank, hit in enumerate(hits[offset:], 1)
        ]
        for hits in found
    ]
    exhausted = [len(hits) < k + offset for hits in found]  # the gallery ends on this page
    return {
        "hits": pages[0],
        "exhausted": exhausted[0],
        "results": [
            group(query=q, hits=p, exhausted=e)
            for q, p, e in zip(labels, pages, exhausted, strict=True)
        ],
        "k": k,
        "offset": offset,
        "bundle_id": gallery.bundle.bundle_id,
        "index_version": gallery.version,
    }


async def _read_body(request: Request, limit: int) -> bytes:
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


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise BadContent("the request body is nested too deeply", "malformed_json") from None
    except ValueError:  # JSONDecodeError, bad UTF-8, an integer of over 4300 digits
        raise BadContent("the request body is not valid JSON", "malformed_json") from None


def _validated(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]
        ) from None


@api.post(
    "/search/text-to-image",
    response_model=TextToImageResponse,
    dependencies=[Depends(require_json)],
    openapi_extra=_json_body(TextQuery),
    responses=_SEARCH_ERRORS,
    tags=["search"],
)
async def text_to_image(
    request: Request, engine: EngineDep, settings: SettingsDep
) -> TextToImageResponse:
    """Search gallery images with text: the text tower encodes, the image index answers."""
    start = time.perf_counter()
    body = await _read_body(request, settings.max_text_body_bytes)
    query = _validated(TextQuery, _parse_json(body))
    texts = [query.text] if query.text is not None else list(query.texts or [])
    _check_texts(texts, query.text is not None, settings)
    k, offset = _page(query.k, query.offset, settings)
    found = await _search(request, engine, "text", texts, texts, k, offset)
    return TextToImageResponse(**found, took_ms=_took_ms(start))


_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more image files (field 'image' or 'images')",
                        },
                        "k": {"type": "integer", "minimum": 1},
                        "offset": {"type": "integer", "minimum": 0},
                    },
                }
            },
            "application/json": {
                "schema": ImageQuery.model_json_schema(),
            },
        },
    }
}


@api.post(
    "/search/image-to-text",
    response_model=ImageToTextResponse,
    openapi_extra=_IMAGE_BODY,
    responses=_SEARCH_ERRORS,
    tags=["search"],
)
async def image_to_text(
    request: Request, engine: EngineDep, settings: SettingsDep
) -> ImageToTextResponse:
    """Search gallery captions with images (multipart upload, or JSON with base64): the image
    tower encodes, the caption index answers."""
    start = time.perf_counter()
    gallery = engine.current()  # a 503 before reading a large body
    names, payloads, k, offset = await _read_images(request, settings)
    k, offset = _page(k, offset, settings)
    # Preprocess with this gallery's bundle and encode with its encoders, even if a swap
    # to another bundle happens meanwhile.
    pixels = await run_in_threadpool(_decode_all, names, payloads, gallery, engine, settings)
    found = await _search(request, engine, "image", names, pixels, k, offset, gallery)
    return ImageToTextResponse(**found, took_ms=_took_ms(start))


def _decode_all(
    names: list[str], payloads: list[bytes], gallery: Gallery, engine: Engine, settings: Settings
) -> list[np.ndarray]:
    spec = gallery.bundle.image_spec
    pixels = []
    for name, data in zip(names, payloads, strict=True):
        with engine.metrics.timed("decode", "image"):
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


async def _read_images(
    request: Request, settings: Settings
) -> tuple[list[str], list[bytes], int | None, int]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await _read_multipart(request, settings)
    if kind == "application/json" or kind.endswith("+json"):
        return await _read_json_images(request, settings)
    raise UnsupportedMedia(
        f"expected multipart/form-data or application/json, got {kind or 'none'}",
        "wrong_content_type",
    )


async def _read_json_images(
    request: Request, settings: Settings
) -> tuple[list[str], list[bytes], int | None, int]:
    body = await _read_body(request, settings.max_body_bytes)
    query = _validated(ImageQuery, _parse_json(body))
    single = query.image is not None
    encoded = [query.image] if query.image is not None else list(query.images or [])
    _check_batch(len(encoded), "images", settings)
    names = ["image"] if single else [f"images[{i}]" for i in range(len(encoded))]
    payloads = [
        decode_base64(text, settings.max_image_bytes, name)
        for name, text in zip(names, encoded, strict=True)
    ]
    return names, payloads, query.k, query.offset


_FORM_INT = re.compile(r"[+-]?[0-9]{1,18}")  # ASCII digits only: int() reads '٣' too


def _form_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _FORM_INT.fullmatch(value.strip()):
        raise InvalidInput(f"{name}: expected an integer, got {str(value)[:40]!r}")
    return int(value)


async def _read_multipart(
    request: Request, settings: Settings
) -> tuple[list[str], list[bytes], int | None, int]:
    form = await request.form(max_files=settings.max_batch + 1, max_fields=8)
    unknown = set(form.keys()) - {"image", "images", "k", "offset"}
    if unknown & {"text", "texts"}:
        raise InvalidInput(
            "send either text or an image, not both: use /search/text-to-image for text",
            "text_and_image",
        )
    if unknown:
        raise InvalidInput(f"unexpected form fields {sorted(unknown)} (use 'image', 'k', 'offset')")
    uploads = form.getlist("image") + form.getlist("images")
    if any(not isinstance(item, UploadFile) for item in uploads):
        raise InvalidInput("image: expected a file upload, got a plain form field")
    _check_batch(len(uploads), "image", settings)
    names, payloads = [], []
    for i, upload in enumerate(uploads):
        assert isinstance(upload, UploadFile)
        names.append(upload.filename or f"image[{i}]")
        payloads.append(await upload.read(settings.max_image_bytes + 1))
    offset = _form_int(form.get("offset"), "offset")
    return names, payloads, _form_int(form.get("k"), "k"), 0 if offset is None else offset


# -- gallery images, info, metrics -----------------------------------------------------------


@api.get(
    "/images/{image_id:path}",
    tags=["gallery"],
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}, **_errors(404, 422, 503)},
)
async def gallery_image(
    image_id: str,
    request: Request,
    engine: EngineDep,
    size: Annotated[
        int | None, Query(ge=16, le=1024, description="longest side of a JPEG thumbnail")
    ] = None,
) -> Response:
    """A gallery image by id: the original file, or a thumbnail with `size`. Only ids that
    the index holds are served; no path from the request ever reaches the file system."""
    path = engine.current().image_path(image_id)
    if size is None:
        media = mimetypes.guess_type(path.name)[0] or ""
        return FileResponse(path, media_type=media if media.startswith("image/") else None)
    try:
        data = await run_in_threadpool(request.app.state.thumbnails.get, path, size)
    except (OSError, ValueError):
        raise NotFound(f"gallery image {image_id!r} cannot be decoded on the server") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


@api.get("/info", response_model=Info, tags=["status"])
async def info(engine: EngineDep, settings: SettingsDep) -> Info:
    """The bundle, the served index version, gallery size, index types and request limits."""
    gallery = engine.gallery
    bundle = gallery.bundle if gallery is not None else engine.bundle
    index: dict[str, Any] = {}
    counts = {"images": 0, "captions": 0}
    if gallery is not None:
        meta = gallery.index.info
        index = {
            "version": gallery.version,
            "metric": meta.get("metric"),
            "created": meta.get("created"),
            "dataset": meta.get("dataset"),
            "sides": {
                side: {
                    key: s.get(key) for key in ("factory", "count", "search_params", "recall_at_10")
                }
                for side, s in meta.get("sides", {}).items()
            },
        }
        counts = {"images": len(gallery.index.images), "captions": len(gallery.index.texts)}
    return Info(
        bundle={
            "bundle_id": bundle.bundle_id,
            "embed_dim": bundle.embed_dim,
            "precision": bundle.precision,
            "image_spec": bundle.image_spec.to_dict(),
            "text_spec": bundle.text_spec.to_dict(),
        },
        index=index,
        gallery=counts,
        limits={
            "default_k": settings.default_k,
            "max_k": settings.max_k,
            "max_offset": settings.max_offset,
            "max_batch": settings.max_batch,
            "max_text_chars": settings.max_text_chars,
            "max_image_bytes": settings.max_image_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "max_aspect_ratio": settings.max_aspect_ratio,
        },
        ready=gallery is not None,
    )


@api.get("/metrics", tags=["status"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format: requests and latency per endpoint, time per stage."""
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


# -- admin -----------------------------------------------------------------------------------


@admin.post(
    "/reload",
    response_model=ReloadResponse,
    openapi_extra=_json_body(ReloadRequest, required=False),
    responses=_errors(400, 404, 408, 409, 413, 415, 422, 503),
    tags=["admin"],
)
async def reload(request: Request, engine: EngineDep) -> ReloadResponse:
    """Load CURRENT (or `version`, which then becomes CURRENT: a rollback sticks) in the
    background and swap to it; a version built with another bundle is refused (409) and the
    old one keeps serving, unless the service follows bundles (COTS_FOLLOW_BUNDLE): then the
    bundle the version records swaps in with it."""
    body = await _read_body(request, RELOAD_BODY_BYTES)
    version = None
    if body.strip():
        await require_json(request)
        version = _validated(ReloadRequest, _parse_json(body)).version
    if engine.gallery is None and engine.load_error is None:
        raise NotReady("the service is still loading")
    previous, served = await engine.reload(version)
    return ReloadResponse(
        previous_version=previous, index_version=served, swapped=previous != served
    )
