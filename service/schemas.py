"""Request and response models of the public API (the OpenAPI schema is generated from them).

Responses follow the `hits` envelope of CLIP search services (Marqo's `hits`, clip-retrieval's
knn-service list of results with `id`, `similarity`, `caption`, `url`): `hits` holds the first
query's results and `results` one entry per query for batch requests.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.config import JsonDict

from index_builder.store import VERSION_PATTERN

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


def _refuse_keys(data: Any, keys: tuple[str, ...], message: str) -> Any:
    if isinstance(data, dict) and any(key in data for key in keys):
        raise ValueError(message)
    return data


class TextQuery(BaseModel):
    """A text-to-image search: one text or a batch of texts."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"text": "a red apple", "k": 5}, {"texts": ["a cat", "a car"], "k": 3}]
        },
    )

    text: str | None = Field(None, description="one query text")
    texts: list[str] | None = Field(None, description="several query texts (a batch)")
    k: int | None = Field(None, ge=1, description=_K_DOC)
    offset: int = Field(0, ge=0, description=_OFFSET_DOC)

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        return _refuse_keys(
            data,
            ("image", "images"),
            "send either text or an image, not both: this endpoint searches images with "
            "text; use /search/image-to-text for image queries",
        )

    @model_validator(mode="after")
    def _one_of(self) -> TextQuery:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        return self


class ImageQuery(BaseModel):
    """An image-to-text search with base64 images (plain or `data:image/...;base64,` URLs)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"image": "data:image/png;base64,iVBORw0KGgo...", "k": 5}],
        },
    )

    image: str | None = Field(None, description="one image, base64 (a data: URL prefix is ok)")
    images: list[str] | None = Field(None, description="several images (a batch), base64")
    k: int | None = Field(None, ge=1, description=_K_DOC)
    offset: int = Field(0, ge=0, description=_OFFSET_DOC)

    @model_validator(mode="before")
    @classmethod
    def _image_only(cls, data: Any) -> Any:
        return _refuse_keys(
            data,
            ("text", "texts"),
            "send either text or an image, not both: this endpoint searches captions with "
            "images; use /search/text-to-image for text queries",
        )

    @model_validator(mode="after")
    def _one_of(self) -> ImageQuery:
        if (self.image is None) == (self.images is None):
            raise ValueError("give exactly one of 'image' or 'images'")
        return self


class ImageHit(BaseModel):
    id: str = Field(description="gallery image id")
    score: float = Field(description=SCORE_DOC)
    rank: int = Field(description="1-based rank (offset included)")
    captions: list[str] = Field(description="the gallery captions of this image")
    image: str = Field(description="path of the image file on the server")
    url: str = Field(description="where this service serves the image")
    thumbnail_url: str = Field(description="a small JPEG of the image")


class CaptionHit(BaseModel):
    id: str = Field(description="caption id ('<image id>#<n>')")
    score: float = Field(description=SCORE_DOC)
    rank: int = Field(description="1-based rank (offset included)")
    text: str = Field(description="the caption")
    image_id: str = Field(description="the gallery image this caption describes")
    image: str = Field(description="path of that image on the server")
    url: str = Field(description="where this service serves that image")
    thumbnail_url: str = Field(description="a small JPEG of that image")


class _Envelope(BaseModel):
    k: int = Field(description="results asked per query")
    offset: int
    took_ms: float = Field(description="time spent in the service, decode to response")
    bundle_id: str = Field(description="the bundle (model) that encoded the query")
    index_version: str = Field(description="the index version that was searched")
    exhausted: bool = Field(description="the first (or only) query's `exhausted`")


class ImageResults(BaseModel):
    query: str = Field(description="the query text")
    hits: list[ImageHit]
    exhausted: bool = Field(description=_EXHAUSTED_DOC)


class CaptionResults(BaseModel):
    query: str = Field(description="the uploaded file name, or 'image[i]' for base64 input")
    hits: list[CaptionHit]
    exhausted: bool = Field(description=_EXHAUSTED_DOC)


_IMAGE_HIT: JsonDict = {
    "id": "oca-00042",
    "score": 0.3127,
    "rank": 1,
    "captions": ["a red apple"],
    "image": "/data/gallery/images/oca-00042.png",
    "url": "/images/oca-00042",
    "thumbnail_url": "/images/oca-00042?size=256",
}
_CAPTION_HIT: JsonDict = {
    "id": "oca-00042#0",
    "score": 0.2981,
    "rank": 1,
    "text": "a red apple",
    "image_id": "oca-00042",
    "image": "/data/gallery/images/oca-00042.png",
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


class TextToImageResponse(_Envelope):
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


class ImageToTextResponse(_Envelope):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "hits": [_CAPTION_HIT],
                    "results": [{"query": "apple.png", "hits": [_CAPTION_HIT], "exhausted": False}],
                    **_ENVELOPE,
                }
            ]
        }
    )
    hits: list[CaptionHit] = Field(description="the hits of the first (or only) query")
    results: list[CaptionResults] = Field(description="one entry per query, in request order")


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
    index: dict[str, Any] = Field(description="version, metric, per side: factory, count, recall")
    gallery: dict[str, int] = Field(description="images and captions served")
    limits: dict[str, int | float] = Field(
        description="request limits (k, offset, batch, text, image bytes, pixels and shape)"
    )
    ready: bool
