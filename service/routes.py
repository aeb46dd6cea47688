"""The HTTP routes: thin handlers that validate, hand queries to the engine and shape hits."""

from __future__ import annotations

import mimetypes
import time
from collections.abc import Sequence
from functools import partial
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from pydantic_core import to_json

from index_builder.collection import ChangeResult
from index_builder.search import Searcher
from service.decode import (
    MAX_SEARCH_VALUES,
    check_batch,
    check_upload,
    decodes_large,
    images_to_pixels,
    parse_json,
    read_body,
    read_image_search,
    read_items,
    read_json,
    validate,
)
from service.deps import EngineDep, SettingsDep, require_admin_key, require_api_key, require_json
from service.engine import Engine, Hits, counts
from service.errors import InvalidInput, NotFound, NotReady
from service.schemas import (
    AddItems,
    ChangeResponse,
    DeleteItems,
    ErrorBody,
    ImageQuery,
    ImageSearchResponse,
    ImageToImageQuery,
    Info,
    Readiness,
    Refusal,
    ReloadRequest,
    ReloadResponse,
    Status,
    TextQuery,
    TextSearchResponse,
    TextToTextQuery,
)
from service.settings import Settings

THUMBNAIL_SIZE = 256
RELOAD_BODY_BYTES = 16384
_ERROR_TEXT = {
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


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": _ERROR_TEXT[status]} for status in statuses}


def _json_body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads and validates its JSON itself."""
    schema = {"application/json": {"schema": model.model_json_schema()}}
    return {"requestBody": {"required": required, "content": schema}}


public = APIRouter()
# 422 documented on every route: FastAPI would otherwise add its own HTTPValidationError,
# a body this service never sends (every error is an ErrorBody).
api = APIRouter(dependencies=[Depends(require_api_key)], responses=_errors(401, 422))
admin = APIRouter(
    prefix="/admin", dependencies=[Depends(require_admin_key)], responses=_errors(401, 403, 422)
)
_SEARCH_ERRORS = _errors(400, 404, 408, 413, 415, 422, 503)
_CHANGE_ERRORS = _errors(400, 404, 408, 409, 413, 415, 422, 503, 507)


# -- liveness and readiness (no key: probes must reach them) --------------------------------


@public.get("/health", response_model=Status, tags=["status"])
async def health() -> Status:
    """The process is alive (it may still be loading)."""
    return Status(status="ok")


@public.get(
    "/ready",
    response_model=Readiness,
    response_model_exclude_none=True,
    tags=["status"],
    responses=_errors(503),
)
async def ready(engine: EngineDep) -> Readiness:
    """200 once the bundle and an index are loaded, naming the version served and the last
    version refused since (and why: the served one keeps serving); 503 before, with code
    `not_ready` while loading and `load_failed` after a failed load (retried: move CURRENT or
    reload another version; the details are in the log), and `index_corrupt` once a search
    found the served version's files damaged on disk (serve another version)."""
    gallery = engine.ready()
    refused = None
    if engine.refusal is not None:
        refused = Refusal(version=engine.refusal[0], reason=engine.refusal[1])
    return Readiness(
        status="ready",
        index_version=gallery.version,
        bundle_id=gallery.bundle.bundle_id,
        refused=refused,
    )


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


def _check_texts(texts: Sequence[str], single: bool, settings: Settings) -> None:
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


def _image_hit(
    request: Request, gallery: Searcher, hit: dict[str, Any], paths: bool
) -> dict[str, Any]:
    """An `ImageHit`: its fields in order, a None one left out."""
    shaped = {key: hit[key] for key in _IMAGE_HIT_KEYS}
    return {**shaped, **_links(request, gallery, hit["id"], paths)}


def _text_hit(
    request: Request, gallery: Searcher, hit: dict[str, Any], paths: bool
) -> dict[str, Any]:
    """A `TextHit`; a caption also links the image it describes, when the index serves it."""
    shaped = {key: hit[key] for key in _TEXT_HIT_KEYS}
    image_id = hit.get("image_id")
    if image_id is None:
        return shaped
    shaped["image_id"] = image_id
    index = gallery.index
    if not index.has("image") or index.row_of("image", image_id) is None:
        return shaped
    return {**shaped, **_links(request, gallery, image_id, paths)}


def _links(request: Request, gallery: Searcher, image_id: str, paths: bool) -> dict[str, Any]:
    """The URLs of a gallery image, and its server path when paths are exposed."""
    url = f"{request.scope.get('root_path', '')}/images/{quote(image_id, safe='')}"
    links = {"url": url, "thumbnail_url": f"{url}?size={THUMBNAIL_SIZE}"}
    if paths:
        links["image_path"] = str(gallery.image_path(image_id))
    return links


_IMAGE_HIT_KEYS = ("id", "score", "rank", "captions", "meta")
_TEXT_HIT_KEYS = ("id", "score", "rank", "text", "meta")
_SHAPES = {"image": _image_hit, "text": _text_hit}


def _respond(
    request: Request,
    settings: Settings,
    gallery: Searcher,
    side: str,
    labels: list[str],
    found: list[Hits],
    page: tuple[int, int],
    start: float,
) -> Response:
    """The response envelope: per-query results, `hits` the first's, and the bundle and
    index version of the searcher the request was served with.

    The body is plain dicts that follow the route's response model (`ImageHit` / `TextHit`
    in an `ImageSearchResponse` / `TextSearchResponse`, None fields left out), serialised by
    pydantic-core as FastAPI would: building the models and FastAPI's validation of them
    cost ~30 us more per 10-hit response (tests check each body against its model)."""
    make_hit = _SHAPES[side]
    pages = [
        [make_hit(request, gallery, hit, settings.expose_paths) for hit in hits] for hits in found
    ]
    body = _envelope(labels, pages, page, gallery, start)
    return Response(to_json(body, inf_nan_mode="null"), media_type="application/json")


def _envelope(
    labels: list[str],
    pages: list[list[Any]],
    page: tuple[int, int],
    gallery: Searcher,
    start: float,
) -> dict[str, Any]:
    """The fields every search response shares, around one page of shaped hits per query."""
    exhausted = [len(hits) < page[0] for hits in pages]  # the gallery ends on this page
    return {
        "k": page[0],
        "offset": page[1],
        "took_ms": round((time.perf_counter() - start) * 1000, 3),
        "bundle_id": gallery.bundle.bundle_id,
        "index_version": gallery.version,
        "exhausted": exhausted[0],
        "hits": pages[0],
        "results": [
            {"query": q, "hits": p, "exhausted": e}
            for q, p, e in zip(labels, pages, exhausted, strict=True)
        ],
    }


async def _text_search(
    request: Request, engine: Engine, settings: Settings, query: TextQuery, side: str
) -> Any:
    start = time.perf_counter()
    item_id = getattr(query, "id", None)
    if item_id is not None:
        page = _page(query.k, query.offset, settings)
        gallery, hits = await engine.similar(side, item_id, *page, filter=query.filter)
        return _respond(request, settings, gallery, side, [item_id], [hits], page, start)
    texts = [query.text] if query.text is not None else list(query.texts or [])
    _check_texts(texts, query.text is not None, settings)
    page = _page(query.k, query.offset, settings)
    gallery, found = await engine.search("text", side, texts, *page, filter=query.filter)
    return _respond(request, settings, gallery, side, texts, found, page, start)


async def _image_search(
    request: Request, engine: Engine, settings: Settings, side: str, model: type[ImageQuery]
) -> Any:
    start = time.perf_counter()
    gallery = engine.current()  # a 503 before reading a large body
    query = await read_image_search(request, settings, model)
    page = _page(query.k, query.offset, settings)
    if query.id is not None:
        gallery, hits = await engine.similar(side, query.id, *page, filter=query.filter)
        return _respond(request, settings, gallery, side, [query.id], [hits], page, start)
    # Preprocess with this searcher's bundle and encode with its encoders, even if a swap
    # to another bundle happens meanwhile.
    spec = gallery.bundle.image_spec
    decode = partial(images_to_pixels, query.names, query.payloads, spec, settings, engine.metrics)
    if decodes_large(query.payloads):  # bounded: a burst of them is a 503 busy, not OOM
        pixels = await engine.decode(decode)
    else:
        pixels = await run_in_threadpool(decode)
    gallery, found = await engine.search(
        "image", side, pixels, *page, filter=query.filter, gallery=gallery
    )
    return _respond(request, settings, gallery, side, query.names, found, page, start)


@api.post(
    "/search/text-to-image",
    response_model=ImageSearchResponse,
    response_model_exclude_none=True,
    dependencies=[Depends(require_json)],
    openapi_extra=_json_body(TextQuery),
    responses=_SEARCH_ERRORS,
    tags=["search"],
)
async def text_to_image(request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    """Search gallery images with text: the text tower encodes, the image index answers."""
    body = await read_json(request, settings.max_text_body_bytes, MAX_SEARCH_VALUES)
    query = validate(TextQuery, body, settings.max_batch)
    return await _text_search(request, engine, settings, query, "image")


@api.post(
    "/search/text-to-text",
    response_model=TextSearchResponse,
    response_model_exclude_none=True,
    dependencies=[Depends(require_json)],
    openapi_extra=_json_body(TextToTextQuery),
    responses=_SEARCH_ERRORS,
    tags=["search"],
)
async def text_to_text(request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    """Search texts with text (the text tower encodes, the text index answers), or texts like
    an indexed one (`id`: its stored vector, no encoding)."""
    body = await read_json(request, settings.max_text_body_bytes, MAX_SEARCH_VALUES)
    query = validate(TextToTextQuery, body, settings.max_batch)
    return await _text_search(request, engine, settings, query, "text")


def _image_body(model: type[ImageQuery]) -> dict[str, Any]:
    """The two request bodies of an image search, for the OpenAPI document."""
    form = {
        "image": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "one or more image files (field 'image' or 'images')",
        },
        "k": {"type": "integer", "minimum": 1},
        "offset": {"type": "integer", "minimum": 0},
        "filter": {"type": "string", "description": "a metadata filter as JSON text"},
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["image"], "properties": form}
                },
                "application/json": {"schema": model.model_json_schema()},
            },
        }
    }


@api.post(
    "/search/image-to-text",
    response_model=TextSearchResponse,
    response_model_exclude_none=True,
    openapi_extra=_image_body(ImageQuery),
    responses=_SEARCH_ERRORS,
    tags=["search"],
)
async def image_to_text(request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    """Search texts with images (multipart upload, or JSON with base64): the image tower
    encodes, the text index answers."""
    return await _image_search(request, engine, settings, "text", ImageQuery)


@api.post(
    "/search/image-to-image",
    response_model=ImageSearchResponse,
    response_model_exclude_none=True,
    openapi_extra=_image_body(ImageToImageQuery),
    responses=_SEARCH_ERRORS,
    tags=["search"],
)
async def image_to_image(request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    """Search gallery images with images (multipart upload, or JSON with base64: the image
    tower encodes), or images like a gallery image (JSON `id`: its stored vector)."""
    return await _image_search(request, engine, settings, "image", ImageToImageQuery)


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
    path = await run_in_threadpool(engine.image_file, image_id)  # Milvus: a round trip
    if size is None:
        media = mimetypes.guess_type(path.name)[0] or ""
        return FileResponse(path, media_type=media if media.startswith("image/") else None)
    try:
        data = await run_in_threadpool(request.app.state.thumbnails.get, path, size)
    except (OSError, ValueError):
        raise NotFound(f"gallery image {image_id!r} cannot be decoded on the server") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


@api.get("/info", response_model=Info, tags=["status"], responses=_errors(503))
async def info(engine: EngineDep, settings: SettingsDep) -> Info:
    """The bundle, the served index version, gallery size, index types and request limits."""
    gallery = engine.gallery
    bundle = gallery.bundle if gallery is not None else engine.bundle
    index: dict[str, Any] = {}
    served = {"image": 0, "text": 0}
    if gallery is not None:
        meta = gallery.index.info
        keys = ("factory", "count", "deleted", "search_params", "recall_at_10", "fields")
        index = {
            "version": gallery.version,
            "backend": meta.get("backend", "faiss"),
            "metric": meta.get("metric"),
            "created": meta.get("created"),
            "dataset": _public_dataset(meta.get("dataset")),
            "sides": {side: {key: s.get(key) for key in keys} for side, s in meta["sides"].items()},
        }
        served = counts(gallery)
    return Info(
        bundle={
            "bundle_id": bundle.bundle_id,
            "embed_dim": bundle.embed_dim,
            "precision": bundle.precision,
            "image_spec": bundle.image_spec.to_dict(),
            "text_spec": bundle.text_spec.to_dict(),
        },
        index=index,
        gallery={"images": served["image"], "texts": served["text"]},
        limits={
            "default_k": settings.default_k,
            "max_k": settings.max_k,
            "max_offset": settings.max_offset,
            "max_batch": settings.max_batch,
            "max_text_chars": settings.max_text_chars,
            "max_image_bytes": settings.max_image_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "max_admin_items": settings.max_admin_items,
            "max_aspect_ratio": settings.max_aspect_ratio,
        },
        ready=gallery is not None,
    )


def _public_dataset(dataset: Any) -> Any:
    """The dataset a version was built from, less where it lies on the server."""
    if not isinstance(dataset, dict):
        return dataset
    return {key: value for key, value in dataset.items() if key != "path"}


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
    body = await read_body(request, RELOAD_BODY_BYTES)
    version = None
    if body.strip():
        await require_json(request)
        version = validate(ReloadRequest, parse_json(body)).version
    if engine.gallery is None and engine.load_error is None:
        raise NotReady("the service is still loading")
    previous, served = await engine.reload(version)
    return ReloadResponse(
        previous_version=previous, index_version=served, swapped=previous != served
    )


@admin.post(
    "/items",
    response_model=ChangeResponse,
    responses=_CHANGE_ERRORS,
    tags=["admin"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": AddItems.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            },
                            "ids": {"type": "string", "description": "JSON list of ids"},
                            "meta": {
                                "type": "string",
                                "description": "JSON object (every file) or list (one per file)",
                            },
                            "upsert": {"type": "boolean"},
                        },
                    }
                },
            },
        }
    },
)
async def add_items(request: Request, engine: EngineDep, settings: SettingsDep) -> ChangeResponse:
    """Add images (multipart files, or JSON base64) and texts (JSON) to the collection as a
    new index version, then serve it. Ids already present are skipped, or replaced with
    `upsert`; uploaded files are kept under the index root (`files/`), by content."""
    engine.current()
    items = await read_items(request, settings)
    extensions = await run_in_threadpool(lambda: [check_upload(u, settings) for u in items.images])
    previous, result = await engine.add(items, extensions)
    return _changed(previous, result, engine)


@admin.post(
    "/delete",
    response_model=ChangeResponse,
    dependencies=[Depends(require_json)],
    openapi_extra=_json_body(DeleteItems),
    responses=_CHANGE_ERRORS,
    tags=["admin"],
)
async def delete_items(request: Request, engine: EngineDep) -> ChangeResponse:
    """Delete items by id (from `side`, or from every side that holds them; an image's
    captions go with it) as a new index version, then serve it. An unknown id is a 404 and
    nothing changes."""
    body = validate(DeleteItems, await read_json(request, RELOAD_BODY_BYTES * 64))
    previous, result = await engine.delete(body.ids, body.side)
    return _changed(previous, result, engine)


def _changed(previous: str, result: ChangeResult, engine: Engine) -> ChangeResponse:
    served = counts(engine.current())
    return ChangeResponse(
        previous_version=previous,
        index_version=result.version,
        added=result.added,
        replaced=result.replaced,
        skipped_existing=result.skipped_existing,
        deleted=result.deleted,
        gallery={"images": served["image"], "texts": served["text"]},
    )
