"""Shaping search results: the page asked for, each hit with its links, and the response
envelope every search shares (per-query results, `hits` the first's, bundle and version)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request, Response
from pydantic_core import to_json

from index_builder.backends.base import Hit
from index_builder.search import Searcher
from service.engine import Found
from service.errors import InvalidInput
from service.settings import Settings

THUMBNAIL_SIZE = 256  # the longest side of the thumbnails hits link to
IMAGE_HIT_KEYS = ("id", "score", "rank", "captions", "meta")
TEXT_HIT_KEYS = ("id", "score", "rank", "text", "meta")
Hits = list[Hit]


def page(k: int | None, offset: int, settings: Settings) -> tuple[int, int]:
    """(k, offset) of a request, `k` defaulted and both checked against the limits."""
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


def image_url(request: Request, image_id: str) -> str:
    """Where this service serves a gallery image (its id quoted, under the root path)."""
    return f"{request.scope.get('root_path', '')}/images/{quote(image_id, safe='')}"


def links(request: Request, image_id: str, path: str | None) -> dict[str, Any]:
    """The URLs of a gallery image, and its server `path` when paths are exposed (given)."""
    url = image_url(request, image_id)
    shaped = {"url": url, "thumbnail_url": f"{url}?size={THUMBNAIL_SIZE}"}
    if path is not None:
        shaped["image_path"] = path
    return shaped


def image_hit(
    request: Request, hit: Hit, described: dict[str, str | None], paths: bool
) -> dict[str, Any]:
    """An `ImageHit`: its fields in order, a None one left out, its links from its row."""
    fields = Searcher.hit("image", hit)
    shaped = {key: fields[key] for key in IMAGE_HIT_KEYS}
    path = str(Path(hit.item["image"])) if paths else None
    return {**shaped, **links(request, shaped["id"], path)}


def text_hit(
    request: Request, hit: Hit, described: dict[str, str | None], paths: bool
) -> dict[str, Any]:
    """A `TextHit`; a caption also links the image it describes when the index serves it
    (`described`: the image may have been deleted on its own)."""
    fields = Searcher.hit("text", hit)
    shaped = {key: fields[key] for key in TEXT_HIT_KEYS}
    image_id = fields.get("image_id")
    if image_id is None:
        return shaped
    shaped["image_id"] = image_id
    if image_id not in described:
        return shaped
    return {**shaped, **links(request, image_id, described[image_id] if paths else None)}


def video_links(request: Request, video_id: str, keyframes: int) -> dict[str, Any]:
    """The URLs of a gallery video: its keyframe strip, thumbnail, file and keyframes."""
    base = f"{request.scope.get('root_path', '')}"
    quoted = quote(video_id, safe="")
    return {
        "url": f"{base}/images/{quoted}",
        "thumbnail_url": f"{base}/images/{quoted}?size={THUMBNAIL_SIZE}",
        "video_url": f"{base}/videos/{quoted}",
        "keyframe_urls": [f"{base}/videos/{quoted}/keyframes/{i}" for i in range(keyframes)],
    }


SHAPES = {"image": image_hit, "text": text_hit}


def envelope(
    labels: list[str],
    pages: list[list[Any]],
    page: tuple[int, int],
    searcher: Searcher,
    start: float,
) -> dict[str, Any]:
    """The fields every search response shares, around one page of shaped hits per query."""
    exhausted = [len(hits) < page[0] for hits in pages]  # the gallery ends on this page
    return {
        "k": page[0],
        "offset": page[1],
        "took_ms": round((time.perf_counter() - start) * 1000, 3),
        "bundle_id": searcher.bundle.bundle_id,
        "index_version": searcher.version,
        "exhausted": exhausted[0],
        "hits": pages[0],
        "results": [
            {"query": q, "hits": p, "exhausted": e}
            for q, p, e in zip(labels, pages, exhausted, strict=True)
        ],
    }


def respond(
    request: Request,
    settings: Settings,
    side: str,
    labels: list[str],
    found: Found,
    page: tuple[int, int],
    start: float,
) -> Response:
    """The response of a search of `side`: per-query results, `hits` the first's, and the
    bundle and index version of the searcher the request was served with.

    The body is plain dicts that follow the route's response model (`ImageHit` / `TextHit`
    in an `ImageSearchResponse` / `TextSearchResponse`, None fields left out), serialised by
    pydantic-core as FastAPI would: building the models and FastAPI's validation of them
    cost ~30 us more per 10-hit response (tests check each body against its model). Nothing
    here calls the index: the hits carry their rows, `found.described` the images captions
    describe."""
    make_hit, paths = SHAPES[side], settings.expose_paths
    pages = [
        [make_hit(request, hit, found.described, paths) for hit in hits] for hits in found.hits
    ]
    body = envelope(labels, pages, page, found.searcher, start)
    return Response(to_json(body, inf_nan_mode="null"), media_type="application/json")
