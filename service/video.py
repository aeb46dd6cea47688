"""Video search: text-to-video, video-to-text (a clip upload), video files and keyframes.

Videos are items of the index's image side (`index_builder.video_index`), so text-to-video is
a text-to-image search restricted to `{"media": "video"}` and its hits add the video's URL and
its keyframe URLs; video-to-text decodes the clip's sampled frames (limits checked first, under
a time limit) and encodes them with the bundle's video encoder. A bad clip is a 4xx JSON error:
413 (bytes, pixels, duration over a limit), 415 (not a video: an image, audio only, an unknown
codec, the wrong content type), 422 (empty, corrupt, truncated, too slow to decode).
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from index_builder.search import Searcher, SideMissing
from index_builder.video import VideoError, VideoLimits
from index_builder.video_index import is_video_row
from service.decode import form_int, parse_filter, read_json, request_kind, validate
from service.deps import EngineDep, SettingsDep, require_api_key, require_json
from service.engine import Engine
from service.errors import InvalidInput, NotFound, TooLarge, UnsupportedMedia
from service.routes import (
    _SEARCH_ERRORS,
    _check_texts,
    _envelope,
    _errors,
    _json_body,
    _page,
    _respond,
)
from service.schemas import SCORE_DOC, TextQuery, TextSearchResponse, _Envelope
from service.settings import Settings

ERROR_OF = {"too_large": TooLarge, "unsupported": UnsupportedMedia, "invalid": InvalidInput}


def upload_limits(settings: Settings) -> VideoLimits:
    """The decode limits of uploaded clips (`COTS_MAX_VIDEO_*`, `COTS_VIDEO_TIMEOUT_S`)."""
    return VideoLimits(
        max_bytes=settings.max_video_bytes,
        max_pixels=settings.max_video_pixels,
        max_seconds=settings.max_video_seconds,
        timeout_s=settings.video_timeout_s,
    )


class VideoHit(BaseModel):
    id: str = Field(description="gallery video id")
    score: float = Field(description=SCORE_DOC)
    rank: int = Field(description="1-based rank (offset included)")
    captions: list[str] = Field(description="the gallery captions of this video (may be empty)")
    meta: dict[str, Any] = Field(description="the video's metadata (`media` is 'video')")
    url: str = Field(description="the keyframe strip (JPEG): the sampled frames in time order")
    thumbnail_url: str = Field(description="a small JPEG of the strip")
    video_url: str = Field(description="the video file, served by id")
    keyframe_urls: list[str] = Field(description="one JPEG per sampled frame, in time order")


class VideoResults(BaseModel):
    query: str
    hits: list[VideoHit]
    exhausted: bool = Field(description="fewer hits than k: no later page holds more")


class VideoSearchResponse(_Envelope):
    """Hits from the gallery's videos: text-to-video."""

    hits: list[VideoHit] = Field(description="the hits of the first (or only) query")
    results: list[VideoResults] = Field(description="one entry per query, in request order")


class VideoInfo(BaseModel):
    videos: int = Field(description="videos served (items of the image side with media=video)")
    video_spec: dict[str, Any] | None = Field(description="frames, sampling, pooling; or null")
    limits: dict[str, float] = Field(description="upload limits of video-to-text")


# 422 documented on every route: FastAPI would otherwise add its own HTTPValidationError,
# a body this service never sends (every error is an ErrorBody).
router = APIRouter(
    dependencies=[Depends(require_api_key)], responses=_errors(401, 422), tags=["video"]
)


def video_urls(request: Request, item: dict[str, Any]) -> dict[str, Any]:
    base = f"{request.scope.get('root_path', '')}"
    quoted = quote(str(item["id"]), safe="")
    return {
        "url": f"{base}/images/{quoted}",
        "thumbnail_url": f"{base}/images/{quoted}?size=256",
        "video_url": f"{base}/videos/{quoted}",
        "keyframe_urls": [
            f"{base}/videos/{quoted}/keyframes/{i}" for i in range(len(item.get("keyframes", [])))
        ],
    }


def _videos(engine: Engine) -> Searcher:
    gallery = engine.current()
    try:
        gallery.require_videos()
    except SideMissing as exc:
        raise NotFound(f"{exc}: build one from videos with a video bundle", "side_absent") from None
    return gallery


@router.post(
    "/search/text-to-video",
    response_model=VideoSearchResponse,
    dependencies=[Depends(require_json)],
    openapi_extra=_json_body(TextQuery),
    responses=_SEARCH_ERRORS,
)
async def text_to_video(request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    """Search gallery videos with text: the text tower encodes, the videos' vectors answer."""
    start = time.perf_counter()
    query = validate(TextQuery, await read_json(request, settings.max_text_body_bytes))
    gallery = _videos(engine)
    texts = [query.text] if query.text is not None else list(query.texts or [])
    _check_texts(texts, query.text is not None, settings)
    page = _page(query.k, query.offset, settings)
    where = gallery.video_filter(query.filter)
    gallery, found = await engine.search("text", "image", texts, *page, where, gallery)
    pages = [[_video_hit(request, gallery, hit) for hit in hits] for hits in found]
    return VideoSearchResponse(**_envelope(texts, pages, page, gallery, start))


def _video_hit(request: Request, gallery: Searcher, hit: dict[str, Any]) -> VideoHit:
    row = gallery.index.row_of("image", hit["id"])
    assert row is not None  # hits are live rows
    return VideoHit(**hit, **video_urls(request, gallery.index.rows_at("image", [row])[0]))


_UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["video"],
                    "properties": {
                        "video": {"type": "string", "format": "binary"},
                        "k": {"type": "integer", "minimum": 1},
                        "offset": {"type": "integer", "minimum": 0},
                        "filter": {"type": "string", "description": "metadata filter (JSON)"},
                    },
                }
            }
        },
    }
}


async def read_clip(request: Request, limits: VideoLimits) -> tuple[str, bytes, dict[str, Any]]:
    """The multipart `video` file (name, bytes) and the `k`, `offset`, `filter` fields."""
    kind = request_kind(request)
    if kind != "multipart/form-data":
        raise UnsupportedMedia(
            f"expected multipart/form-data with a 'video' file, got {kind or 'none'}",
            "wrong_content_type",
        )
    form = await request.form(max_files=2, max_fields=8)
    unknown = set(form.keys()) - {"video", "k", "offset", "filter"}
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
    fields = {
        "k": form_int(form.get("k"), "k"),
        "offset": 0 if offset is None else offset,
        "filter": parse_filter(form.get("filter")),
    }
    return upload.filename or "video", data, fields


async def decode_clip(
    engine: Engine, gallery: Searcher, data: bytes, limits: VideoLimits, label: str
) -> Any:
    """(pixels, mask) of an uploaded clip, decoded in the engine's decode pool (not the
    encoders') within the time limit (the decoder also stops itself at the deadline)."""
    try:
        with engine.metrics.timed("decode", "video"):
            work = engine.decode(partial(gallery.video_query, data, limits))
            return await asyncio.wait_for(work, timeout=limits.timeout_s + 1.0)
    except TimeoutError:
        raise InvalidInput(
            f"{label}: decoding took longer than the time limit", "decode_timeout"
        ) from None
    except VideoError as exc:
        raise ERROR_OF[exc.kind](f"{label}: {exc}", exc.code) from None


@router.post(
    "/search/video-to-text",
    response_model=TextSearchResponse,
    openapi_extra=_UPLOAD,
    responses=_SEARCH_ERRORS,
)
async def video_to_text(request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    """Search texts with a video clip (multipart `video`): its sampled frames go through the
    image tower and the temporal pooling, the text index answers."""
    start = time.perf_counter()
    gallery = _videos(engine)  # a 404 or 503 before reading a large body
    limits = upload_limits(settings)
    name, data, fields = await read_clip(request, limits)
    page = _page(fields["k"], fields["offset"], settings)
    query = await decode_clip(engine, gallery, data, limits, name)
    gallery, found = await engine_search_video(engine, gallery, query, page, fields["filter"])
    return _respond(request, settings, gallery, "text", [name], [found], page, start)


async def engine_search_video(
    engine: Engine, gallery: Searcher, query: Any, page: tuple[int, int], filter: Any
) -> tuple[Searcher, list[dict[str, Any]]]:
    """One video query: encoded with `gallery`'s encoders in the encoder pool, then searched
    on its text side (the filter checked first)."""
    from service.engine import check_query

    check_query(gallery, "text", filter)
    loop = asyncio.get_running_loop()

    def run() -> list[dict[str, Any]]:
        with engine.metrics.timed("encode", "video"):
            vectors = gallery.encoders.encode("video", [query])
        with engine.metrics.timed("search", "video"):
            return gallery.search("text", vectors, page[0], page[1], filter)[0]

    return gallery, await loop.run_in_executor(engine.executor, run)


def _video_row(engine: Engine, video_id: str) -> dict[str, Any]:
    gallery = engine.current()
    index = gallery.index
    row = index.row_of("image", video_id) if index.has("image") else None
    item = index.rows_at("image", [row])[0] if row is not None else None
    if item is None or not is_video_row(item):
        raise NotFound(f"no gallery video with id {video_id!r}")
    return item


@router.get("/info/video", response_model=VideoInfo)
async def video_info(engine: EngineDep, settings: SettingsDep) -> VideoInfo:
    """How many videos the index serves, the bundle's video spec and the upload limits."""
    gallery = engine.current()
    index, spec = gallery.index, gallery.bundle.video_spec
    count = 0
    if index.has("image") and spec is not None and _has_media(index):
        count = await run_in_threadpool(index.count, "image", gallery.video_filter(None))
    limits = upload_limits(settings)
    return VideoInfo(
        videos=count,
        video_spec=spec.to_dict() if spec else None,
        limits={
            "max_video_bytes": limits.max_bytes,
            "max_video_seconds": limits.max_seconds,
            "max_video_pixels": limits.max_pixels,
            "video_timeout_s": limits.timeout_s,
        },
    )


def _has_media(index: Any) -> bool:
    return "media" in index.info["sides"]["image"].get("fields", {})


@router.get("/videos/{video_id:path}/keyframes/{number}", response_class=Response)
async def keyframe(video_id: str, number: int, engine: EngineDep) -> FileResponse:
    """Sampled frame `number` (0-based, in time order) of a gallery video, as JPEG."""
    frames = _video_row(engine, video_id).get("keyframes", [])
    if not 0 <= number < len(frames):
        raise NotFound(f"video {video_id!r} has {len(frames)} keyframes, not {number + 1}")
    return _file(frames[number], "image/jpeg", f"keyframe {number} of video {video_id!r}")


@router.get("/videos/{video_id:path}", response_class=Response)
async def video_file(video_id: str, engine: EngineDep) -> FileResponse:
    """The video file of a gallery video, by id (no client path reaches the file system)."""
    return _file(_video_row(engine, video_id)["video"], None, f"video {video_id!r}")


def _file(path: str, media: str | None, what: str) -> FileResponse:
    from pathlib import Path

    if not Path(path).is_file():
        raise NotFound(f"the file of {what} is missing on the server")
    return FileResponse(path, media_type=media)
