"""Request and response models of the public API (the OpenAPI schema is generated from them).

Responses follow the `hits` envelope of CLIP search services (Marqo's `hits`, clip-retrieval's
knn-service list of results with `id`, `similarity`, `caption`, `url`): `hits` holds the first
query's results and `results` one entry per query for batch requests.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator
from pydantic.config import JsonDict

from index_builder.backends.base import VERSION_PATTERN

SCORE_DOC = (
    "cosine similarity between the query and the hit embeddings, in [-1, 1] (inner product "
    "of unit vectors; approximate indexes may perturb it slightly); higher is closer"
)
_K_DOC = "results per query (default: the service's default_k; at most its max_k)"
_OFFSET_DOC = "skip this many results first (paging; at most the service's max_offset)"
_EXHAUSTED_DOC = (
    "fewer than k hits: the gallery holds fewer than offset + k items, so no later page has "
    "any (approximate indexes search deeper for deep pages, so a page is never short otherwise)"
)


FILTER_DOC = (
    'metadata filter, ANDed over fields: {"field": value} (equality; on a list field, '
    'contains), {"field": {"in": [v, ...]}}, {"field": {"gte": 1, "lt": 5}} '
    '(numeric ranges: gt, gte, lt, lte), {"field": {"eq": v}}; an unknown field or a '
    "value of the wrong type is a 422 with code invalid_filter"
)
ID_DOC = "'more like this': the id of an indexed item, searched with its stored vector"
_TEXT_ONLY = (
    "send either text or an image, not both: this endpoint takes text queries; image queries "
    "go to /search/image-to-text or /search/image-to-image"
)
_IMAGE_ONLY = (
    "send either text or an image, not both: this endpoint takes image queries; text queries "
    "go to /search/text-to-image or /search/text-to-text"
)


def _refuse_keys(data: Any, keys: tuple[str, ...], message: str) -> Any:
    if isinstance(data, dict) and any(key in data for key in keys):
        raise ValueError(message)
    return data


def _exactly_one(model: BaseModel, names: tuple[str, ...]) -> None:
    if sum(getattr(model, name) is not None for name in names) != 1:
        quoted = [f"'{name}'" for name in names]
        raise ValueError(f"give exactly one of {', '.join(quoted[:-1])} or {quoted[-1]}")


class _Search(BaseModel):
    """What every search takes besides its queries: the page and a metadata filter."""

    model_config = ConfigDict(extra="forbid")

    # Strict: true, "5" and 5.0 are not 5 (loose coercion hid client bugs).
    k: StrictInt | None = Field(None, ge=1, description=_K_DOC)
    offset: StrictInt = Field(0, ge=0, description=_OFFSET_DOC)
    filter: dict[str, Any] | None = Field(None, description=FILTER_DOC)


class TextQuery(_Search):
    """A text-to-image search: one text or a batch of texts."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"text": "a red apple", "k": 5},
                {"texts": ["a cat", "a car"], "k": 3, "filter": {"year": {"gte": 2020}}},
            ]
        },
    )

    text: str | None = Field(None, description="one query text")
    texts: list[str] | None = Field(None, description="several query texts (a batch)")

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        return _refuse_keys(data, ("image", "images"), _TEXT_ONLY)

    @model_validator(mode="after")
    def _one_of(self) -> TextQuery:
        _exactly_one(self, ("text", "texts"))
        return self


class TextToTextQuery(TextQuery):
    """A text-to-text search: texts, or the id of an indexed text ('more like this')."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"text": "a red apple", "k": 5}, {"id": "oca-00042#0"}]},
    )

    id: str | None = Field(None, description=ID_DOC)

    @model_validator(mode="after")
    def _one_of(self) -> TextToTextQuery:
        _exactly_one(self, ("text", "texts", "id"))
        return self


class ImageQuery(_Search):
    """An image-to-text search with base64 images (plain or `data:image/...;base64,` URLs)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"image": "data:image/png;base64,iVBORw0KGgo...", "k": 5}],
        },
    )

    image: str | None = Field(None, description="one image, base64 (a data: URL prefix is ok)")
    images: list[str] | None = Field(None, description="several images (a batch), base64")

    @model_validator(mode="before")
    @classmethod
    def _image_only(cls, data: Any) -> Any:
        return _refuse_keys(data, ("text", "texts"), _IMAGE_ONLY)

    @model_validator(mode="after")
    def _one_of(self) -> ImageQuery:
        _exactly_one(self, ("image", "images"))
        return self


class ImageToImageQuery(ImageQuery):
    """An image-to-image search: base64 images, or a gallery image id ('more like this')."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"image": "data:image/png;base64,iVBORw0KGgo...", "k": 5}, {"id": "red"}]
        },
    )

    id: str | None = Field(None, description=ID_DOC)

    @model_validator(mode="after")
    def _one_of(self) -> ImageToImageQuery:
        _exactly_one(self, ("image", "images", "id"))
        return self


_PATH_DOC = "the file on the server (only when the service sets COTS_EXPOSE_PATHS=true)"
_META_DOC = "the item's metadata (arbitrary JSON, as indexed)"


class ImageHit(BaseModel):
    id: str = Field(description="gallery image id")
    score: float = Field(description=SCORE_DOC)
    rank: int = Field(description="1-based rank (offset included)")
    captions: list[str] = Field(description="the gallery captions of this image (may be empty)")
    meta: dict[str, Any] = Field(description=_META_DOC)
    url: str = Field(description="where this service serves the image (by id)")
    thumbnail_url: str = Field(description="a small JPEG of the image")
    image_path: str | None = Field(None, description=_PATH_DOC)


class TextHit(BaseModel):
    id: str = Field(description="text id (a caption's is '<image id>#<n>')")
    score: float = Field(description=SCORE_DOC)
    rank: int = Field(description="1-based rank (offset included)")
    text: str = Field(description="the text")
    meta: dict[str, Any] = Field(description=_META_DOC)
    image_id: str | None = Field(
        None, description="the gallery image this text describes (captions only)"
    )
    url: str | None = Field(None, description="where this service serves that image, if it does")
    thumbnail_url: str | None = Field(None, description="a small JPEG of that image")
    image_path: str | None = Field(None, description=_PATH_DOC)


class Envelope(BaseModel):
    """The fields every search response shares."""

    k: int = Field(description="results asked per query")
    offset: int
    took_ms: float = Field(description="time spent in the service, decode to response")
    bundle_id: str = Field(description="the bundle (model) that encoded the query")
    index_version: str = Field(description="the index version that was searched")
    exhausted: bool = Field(description="the first (or only) query's `exhausted`")


_QUERY_DOC = (
    "the query text, the uploaded file name ('images[i]' for base64 input), or the id "
    "searched for 'more like this'"
)


class ImageResults(BaseModel):
    query: str = Field(description=_QUERY_DOC)
    hits: list[ImageHit]
    exhausted: bool = Field(description=_EXHAUSTED_DOC)


class TextResults(BaseModel):
    query: str = Field(description=_QUERY_DOC)
    hits: list[TextHit]
    exhausted: bool = Field(description=_EXHAUSTED_DOC)


_IMAGE_HIT: JsonDict = {
    "id": "oca-00042",
    "score": 0.3127,
    "rank": 1,
    "captions": ["a red apple"],
    "meta": {"year": 2021, "tags": ["fruit"]},
    "url": "/images/oca-00042",
    "thumbnail_url": "/images/oca-00042?size=256",
}
_TEXT_HIT: JsonDict = {
    "id": "oca-00042#0",
    "score": 0.2981,
    "rank": 1,
    "text": "a red apple",
    "meta": {},
    "image_id": "oca-00042",
    "url": "/images/oca-00042",
    "thumbnail_url": "/images/oca-00042?size=256",
}
_ENVELOPE: JsonDict = {
    "k": 1,
    "offset": 0,
    "took_ms": 4.2,
    "bundle_id": "3f2a9c1d0b7e6a55",
    "index_version": "v000001-20250101T120000Z",
    "exhausted": False,
}


class ImageSearchResponse(Envelope):
    """Hits from the image side: text-to-image and image-to-image."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "hits": [_IMAGE_HIT],
                    "results": [{"query": "a red apple", "hits": [_IMAGE_HIT], "exhausted": False}],
                    **_ENVELOPE,
                }
            ]
        }
    )
    hits: list[ImageHit] = Field(description="the hits of the first (or only) query")
    results: list[ImageResults] = Field(description="one entry per query, in request order")


class TextSearchResponse(Envelope):
    """Hits from the text side: image-to-text and text-to-text."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "hits": [_TEXT_HIT],
                    "results": [{"query": "apple.png", "hits": [_TEXT_HIT], "exhausted": False}],
                    **_ENVELOPE,
                }
            ]
        }
    )
    hits: list[TextHit] = Field(description="the hits of the first (or only) query")
    results: list[TextResults] = Field(description="one entry per query, in request order")


class ErrorBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"detail": "k: 500 is over max_k=100", "code": "invalid_input"}]
        }
    )
    detail: str = Field(description="what was wrong, for a person")
    code: str = Field(description="a stable machine-readable reason")


class Status(BaseModel):
    status: str


class Refusal(BaseModel):
    version: str = Field(description="an index version that was not served")
    reason: str = Field(description="why (no server paths; the details are in the log)")


class Readiness(Status):
    index_version: str = Field(description="the index version served")
    bundle_id: str = Field(description="the bundle served")
    refused: Refusal | None = Field(
        None, description="the last version refused since the served one swapped in"
    )


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(
        None,
        max_length=24,
        pattern=VERSION_PATTERN,
        description="the name of a version under the index root to serve, which CURRENT then "
        "names (default: what CURRENT names)",
        examples=["v000001-20250101T120000Z"],
    )


class ReloadResponse(BaseModel):
    previous_version: str | None
    index_version: str
    swapped: bool


class Info(BaseModel):
    bundle: dict[str, Any] = Field(description="bundle id, dimension, precision, preprocessing")
    index: dict[str, Any] = Field(
        description="version, metric, per present side: factory, count, recall, metadata fields"
    )
    gallery: dict[str, int] = Field(description="images and texts served (0: side absent)")
    limits: dict[str, int | float] = Field(
        description="request limits (k, offset, batch, text, image bytes, pixels and shape)"
    )
    ready: bool


# -- admin: a live collection ------------------------------------------------------------------

_ITEM_ID = Field(min_length=1, max_length=512, description="the item's id (unique per side)")


class TextItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = _ITEM_ID
    text: str = Field(min_length=1, description="the text")
    meta: dict[str, Any] = Field(default_factory=dict, description=_META_DOC)


class ImageItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = _ITEM_ID
    image: str = Field(description="the image, base64 (a data: URL prefix is ok)")
    meta: dict[str, Any] = Field(default_factory=dict, description=_META_DOC)


class AddItems(BaseModel):
    """Images and texts to add (JSON; images may also come as a multipart upload)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"texts": [{"id": "t1", "text": "a red apple", "meta": {"lang": "en"}}]},
                {"images": [{"id": "apple", "image": "iVBORw0KGgo...", "meta": {"year": 2024}}]},
            ]
        },
    )
    images: list[ImageItem] = Field(default_factory=list)
    texts: list[TextItem] = Field(default_factory=list)
    upsert: StrictBool = Field(
        False, description="replace items whose id is present (else skipped)"
    )


class DeleteItems(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"ids": ["apple", "t1"]}]}
    )
    ids: list[str] = Field(min_length=1, description="ids to delete (all must exist)")
    side: Literal["image", "text"] | None = Field(
        None, description="delete from this side only (default: wherever the id is)"
    )


class ChangeResponse(BaseModel):
    previous_version: str = Field(description="the version served before the change")
    index_version: str = Field(
        description="the new version, now served (unchanged: no change, or with Milvus a change "
        "made in place in the served version, which serves it on return)"
    )
    added: dict[str, int] = Field(description="new items per side")
    replaced: dict[str, int] = Field(description="items replaced per side (upsert)")
    skipped_existing: dict[str, int] = Field(
        description="items per side whose id was present (kept as they were; upsert replaces)"
    )
    deleted: dict[str, int] = Field(
        description="items deleted per side (with an image, the captions that describe it)"
    )
    gallery: dict[str, int] = Field(description="images and texts served now")


# -- video ---------------------------------------------------------------------------------------


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


class VideoSearchResponse(Envelope):
    """Hits from the gallery's videos: text-to-video."""

    hits: list[VideoHit] = Field(description="the hits of the first (or only) query")
    results: list[VideoResults] = Field(description="one entry per query, in request order")


class VideoInfo(BaseModel):
    videos: int = Field(description="videos served (items of the image side with media=video)")
    video_spec: dict[str, Any] | None = Field(description="frames, sampling, pooling; or null")
    limits: dict[str, float] = Field(description="upload limits of video-to-text")
