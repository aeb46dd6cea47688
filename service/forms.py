"""The multipart forms the service reads: their fields, as models the OpenAPI document is
generated from and whose field names the readers accept (`bodies`, `items`)."""

from __future__ import annotations

from pydantic import BaseModel, Field

FILTER_TEXT = "a metadata filter as JSON text"


class ImageForm(BaseModel):
    """An image search as multipart: image files (field `image`, or `images`) and the page."""

    image: list[bytes] = Field(description="one or more image files (field 'image' or 'images')")
    k: int | None = Field(None, ge=1)
    offset: int = Field(0, ge=0)
    filter: str | None = Field(None, description=FILTER_TEXT)


class ItemsForm(BaseModel):
    """Images to add as multipart: the files, their ids and metadata, and `upsert`."""

    image: list[bytes]
    ids: str | None = Field(None, description="JSON list of ids")
    meta: str | None = Field(None, description="JSON object (every file) or list (one per file)")
    upsert: bool = False


class ClipForm(BaseModel):
    """A video-to-text search: one clip (field `video`) and the page."""

    video: bytes
    k: int | None = Field(None, ge=1)
    offset: int = Field(0, ge=0)
    filter: str | None = Field(None, description=FILTER_TEXT)


IMAGE_FIELDS = {*ImageForm.model_fields, "images"}
ITEM_FIELDS = set(ItemsForm.model_fields)
CLIP_FIELDS = set(ClipForm.model_fields)
