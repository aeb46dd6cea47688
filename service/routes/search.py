"""Search routes: text or images in, hits of the image or the text side out."""

from __future__ import annotations

import time
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from index_builder.search import Searcher
from service import images
from service.bodies import (
    MAX_SEARCH_VALUES,
    ImageSearch,
    check_texts,
    read_image_search,
    text_limit,
)
from service.deps import EngineDep, RequestBody, ServedSearcher, SettingsDep, json_body
from service.engine import Engine
from service.forms import ImageForm
from service.routes.openapi import SEARCH_ERRORS, api_router
from service.schemas import (
    ImageQuery,
    ImageSearchResponse,
    ImageToImageQuery,
    TextQuery,
    TextSearchResponse,
    TextToTextQuery,
)
from service.settings import Settings
from service.shaping import page, respond

router = api_router()


async def text_search(
    request: Request, engine: Engine, settings: Settings, query: TextQuery, side: str
) -> Any:
    """Texts (or an indexed item's id) searched on `side`, shaped into the response."""
    start = time.perf_counter()
    item_id = getattr(query, "id", None)
    if item_id is not None:
        asked = page(query.k, query.offset, settings)
        found = await engine.similar(side, item_id, *asked, filter=query.filter)
        return respond(request, settings, side, [item_id], found, asked, start)
    texts = [query.text] if query.text is not None else list(query.texts or [])
    check_texts(texts, query.text is not None, settings)
    asked = page(query.k, query.offset, settings)
    found = await engine.search("text", side, texts, *asked, filter=query.filter)
    return respond(request, settings, side, texts, found, asked, start)


async def image_search(
    request: Request,
    engine: Engine,
    settings: Settings,
    side: str,
    searcher: Searcher,
    query: ImageSearch,
) -> Any:
    """Uploaded images (or an indexed item's id) searched on `side`, shaped likewise;
    `searcher` is the one served before the body was read."""
    start = time.perf_counter()
    asked = page(query.k, query.offset, settings)
    if query.id is not None:
        found = await engine.similar(side, query.id, *asked, filter=query.filter)
        return respond(request, settings, side, [query.id], found, asked, start)
    # Preprocess with this searcher's bundle and encode with its encoders, even if a swap
    # to another bundle happens meanwhile.
    spec = searcher.bundle.image_spec
    decode = partial(
        images.images_to_pixels, query.names, query.payloads, spec, settings, engine.metrics
    )
    if images.decodes_large(query.payloads):  # bounded: a burst of them is a 503 busy, not OOM
        pixels = await engine.decode(decode)
    else:
        pixels = await run_in_threadpool(decode)
    found = await engine.search(
        "image", side, pixels, *asked, filter=query.filter, searcher=searcher
    )
    return respond(request, settings, side, query.names, found, asked, start)


def image_body(model: type[ImageQuery]) -> RequestBody[ImageSearch]:
    """Images to search with: multipart (`ImageForm`) or JSON `model` (base64)."""

    async def read(request: Request, settings: Settings) -> ImageSearch:
        return await read_image_search(request, settings, model)

    return RequestBody(read, {"multipart/form-data": ImageForm, "application/json": model})


TextBody = Annotated[
    TextQuery, Depends(json_body(TextQuery, text_limit, MAX_SEARCH_VALUES, batch=True))
]
TextToTextBody = Annotated[
    TextToTextQuery, Depends(json_body(TextToTextQuery, text_limit, MAX_SEARCH_VALUES, batch=True))
]
ImageBody = Annotated[ImageSearch, Depends(image_body(ImageQuery))]
ImageToImageBody = Annotated[ImageSearch, Depends(image_body(ImageToImageQuery))]


@router.post(
    "/search/text-to-image",
    response_model=ImageSearchResponse,
    response_model_exclude_none=True,
    responses=SEARCH_ERRORS,
    tags=["search"],
)
async def text_to_image(
    request: Request, engine: EngineDep, settings: SettingsDep, query: TextBody
) -> Any:
    """Search gallery images with text: the text tower encodes, the image index answers."""
    return await text_search(request, engine, settings, query, "image")


@router.post(
    "/search/text-to-text",
    response_model=TextSearchResponse,
    response_model_exclude_none=True,
    responses=SEARCH_ERRORS,
    tags=["search"],
)
async def text_to_text(
    request: Request, engine: EngineDep, settings: SettingsDep, query: TextToTextBody
) -> Any:
    """Search texts with text (the text tower encodes, the text index answers), or texts like
    an indexed one (`id`: its stored vector, no encoding)."""
    return await text_search(request, engine, settings, query, "text")


@router.post(
    "/search/image-to-text",
    response_model=TextSearchResponse,
    response_model_exclude_none=True,
    responses=SEARCH_ERRORS,
    tags=["search"],
)
async def image_to_text(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    searcher: ServedSearcher,
    query: ImageBody,
) -> Any:
    """Search texts with images (multipart upload, or JSON with base64): the image tower
    encodes, the text index answers."""
    return await image_search(request, engine, settings, "text", searcher, query)


@router.post(
    "/search/image-to-image",
    response_model=ImageSearchResponse,
    response_model_exclude_none=True,
    responses=SEARCH_ERRORS,
    tags=["search"],
)
async def image_to_image(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    searcher: ServedSearcher,
    query: ImageToImageBody,
) -> Any:
    """Search gallery images with images (multipart upload, or JSON with base64: the image
    tower encodes), or images like a gallery image (JSON `id`: its stored vector)."""
    return await image_search(request, engine, settings, "image", searcher, query)
