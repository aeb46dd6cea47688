"""Reading admin uploads: images (multipart files or JSON base64) and texts to add, their ids
and metadata checked before anything is stored."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from index_builder.filters import check_storable, show
from index_builder.preprocess import (
    load_image,
)
from service.bodies import is_json, parse_json_field, read_json, request_kind, validate
from service.errors import BadContent, InvalidInput, UnsupportedMedia
from service.forms import ITEM_FIELDS
from service.images import EXTENSIONS, check_image, decode_base64, release_after
from service.schemas import AddItems, TextItem
from service.settings import Settings


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


async def _read_item_form(request: Request, settings: Settings) -> Items:
    form = await request.form(max_files=settings.max_admin_items + 1, max_fields=8)
    unknown = set(form.keys()) - ITEM_FIELDS
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
    ids = parse_json_field(value, "ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise InvalidInput("ids: expected a JSON list of non-empty strings")
    if len(ids) != len(files):
        raise InvalidInput(f"ids: {len(ids)} ids for {len(files)} files")
    return ids


def _form_metas(value: Any, count: int) -> list[dict[str, Any]]:
    if value is None:
        return [{} for _ in range(count)]
    meta = parse_json_field(value, "meta")
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
