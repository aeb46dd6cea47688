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
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from index_builder.backends.base import Hit, Version
from index_builder.search import Searcher, SideMissing
from index_builder.video import VideoError, VideoLimits
from service.bodies import Clip, check_texts, read_clip, text_limit
from service.deps import EngineDep, RequestBody, SettingsDep, json_body
from service.engine import Engine, Frames
from service.errors import InvalidInput, NotFound, TooLarge, UnsupportedMedia
from service.forms import ClipForm
from service.routes.openapi import SEARCH_ERRORS, api_router
from service.schemas import TextQuery, TextSearchResponse, VideoHit, VideoInfo, VideoSearchResponse
from service.settings import Settings
from service.shaping import envelope, page, respond, video_links

ERROR_OF = {"too_large": TooLarge, "unsupported": UnsupportedMedia, "invalid": InvalidInput}


def upload_limits(settings: Settings) -> VideoLimits:
    """The decode limits of uploaded clips (`COTS_MAX_VIDEO_*`, `COTS_VIDEO_TIMEOUT_S`)."""
    return VideoLimits(
        max_bytes=settings.max_video_bytes,
        max_pixels=settings.max_video_pixels,
        max_seconds=settings.max_video_seconds,
        timeout_s=settings.video_timeout_s,
    )


router = api_router(tags=["video"])


async def video_searcher(engine: EngineDep) -> Searcher:
    """The served searcher, when it holds videos (404 `side_absent`; 503 while loading)."""
    searcher = engine.current()
    try:
        searcher.require_videos()
    except SideMissing as exc:
        raise NotFound(f"{exc}: build one from videos with a video bundle", "side_absent") from None
    return searcher


async def read_clip_form(request: Request, settings: Settings) -> Clip:
    return await read_clip(request, upload_limits(settings))


VideoSearcher = Annotated[Searcher, Depends(video_searcher)]
TextBody = Annotated[TextQuery, Depends(json_body(TextQuery, text_limit))]
ClipBody = Annotated[Clip, Depends(RequestBody(read_clip_form, {"multipart/form-data": ClipForm}))]


@router.post(
    "/search/text-to-video",
    response_model=VideoSearchResponse,
    responses=SEARCH_ERRORS,
)
async def text_to_video(
    request: Request, engine: EngineDep, settings: SettingsDep, query: TextBody
) -> Any:
    """Search gallery videos with text: the text tower encodes, the videos' vectors answer."""
    start = time.perf_counter()
    searcher = await video_searcher(engine)
    texts = [query.text] if query.text is not None else list(query.texts or [])
    check_texts(texts, query.text is not None, settings)
    asked = page(query.k, query.offset, settings)
    where = searcher.video_filter(query.filter)
    found = await engine.search("text", "image", texts, *asked, where, searcher)
    pages = [[video_hit(request, hit) for hit in hits] for hits in found.hits]
    return VideoSearchResponse(**envelope(texts, pages, asked, found.searcher, start))


def video_hit(request: Request, hit: Hit) -> VideoHit:
    """A `VideoHit`: the hit's fields and its links (the keyframe count from its row)."""
    fields = Searcher.hit("image", hit)
    keyframes = len(hit.item.get("keyframes", []))
    return VideoHit(**fields, **video_links(request, fields["id"], keyframes))


async def decode_clip(
    engine: Engine, searcher: Searcher, data: bytes, limits: VideoLimits, label: str
) -> Frames:
    """(pixels, mask) of an uploaded clip, decoded in the engine's decode pool (not the
    encoders') within the time limit (the decoder also stops itself at the deadline)."""
    try:
        with engine.metrics.timed("decode", "video"):
            work = engine.decode(partial(searcher.video_query, data, limits))
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
    responses=SEARCH_ERRORS,
)
async def video_to_text(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    searcher: VideoSearcher,  # a 404 or 503 before reading a large body
    clip: ClipBody,
) -> Any:
    """Search texts with a video clip (multipart `video`): its sampled frames go through the
    image tower and the temporal pooling, the text index answers."""
    start = time.perf_counter()
    asked = page(clip.k, clip.offset, settings)
    query = await decode_clip(engine, searcher, clip.data, upload_limits(settings), clip.name)
    found = await engine.search_video(searcher, query, *asked, clip.filter)
    return respond(request, settings, "text", [clip.name], found, asked, start)


@router.get("/info/video", response_model=VideoInfo)
async def video_info(engine: EngineDep, settings: SettingsDep) -> VideoInfo:
    """How many videos the index serves, the bundle's video spec and the upload limits."""
    searcher = engine.current()
    index, spec = searcher.index, searcher.bundle.video_spec
    count = 0
    if index.has("image") and spec is not None and has_media(index):
        count = await run_in_threadpool(index.count, "image", searcher.video_filter(None))
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


def has_media(index: Version) -> bool:
    return "media" in index.info["sides"]["image"].get("fields", {})


@router.get("/videos/{video_id:path}/keyframes/{number}", response_class=Response)
async def keyframe(video_id: str, number: int, engine: EngineDep) -> FileResponse:
    """Sampled frame `number` (0-based, in time order) of a gallery video, as JPEG."""
    row = await run_in_threadpool(engine.video_row, video_id)  # Milvus: a round trip
    frames = row.get("keyframes", [])
    if not 0 <= number < len(frames):
        raise NotFound(f"video {video_id!r} has {len(frames)} keyframes, not {number + 1}")
    return file_response(frames[number], "image/jpeg", f"keyframe {number} of video {video_id!r}")


@router.get("/videos/{video_id:path}", response_class=Response)
async def video_file(video_id: str, engine: EngineDep) -> FileResponse:
    """The video file of a gallery video, by id (no client path reaches the file system)."""
    row = await run_in_threadpool(engine.video_row, video_id)  # Milvus: a round trip
    return file_response(row["video"], None, f"video {video_id!r}")


def file_response(path: str, media: str | None, what: str) -> FileResponse:
    if not Path(path).is_file():
        raise NotFound(f"the file of {what} is missing on the server")
    return FileResponse(path, media_type=media)
