"""Untrusted image input: base64, byte, pixel and shape limits checked before decoding, safe
formats."""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from index_builder.preprocess import (
    ImageSpec,
    check_aspect_ratio,
    load_image_for,
    preprocess_image,
)
from service.errors import BadContent, InvalidInput, TooLarge, UnsupportedMedia

# Formats decoded by Pillow itself; EPS (Ghostscript) and friends are never opened.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
_DATA_URL = re.compile(r"^data:([^;,]*)(;[^,]*)?,", re.IGNORECASE)


def decode_base64(text: str, max_bytes: int, label: str) -> bytes:
    """Plain base64 or a `data:image/...;base64,` URL -> bytes (size checked before decoding)."""
    match = _DATA_URL.match(text)
    if match:
        if not (match.group(2) or "").lower().endswith(";base64"):
            raise BadContent(f"{label}: a data URL must be base64-encoded (';base64,')")
        mime = match.group(1).lower()
        if mime and not mime.startswith("image/"):
            raise UnsupportedMedia(f"{label}: data URL type {mime!r} is not an image")
        text = text[match.end() :]
    text = "".join(text.split())
    if len(text) * 3 // 4 > max_bytes:
        raise TooLarge(f"{label}: the image is larger than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadContent(f"{label}: malformed base64") from None
    if not data:
        raise InvalidInput(f"{label}: the image is empty")
    return data


def check_image(
    data: bytes, max_bytes: int, max_pixels: int, max_aspect_ratio: float, label: str
) -> None:
    """Read only the header: refuse non-images, unsafe formats, oversized dimensions and
    extreme shapes."""
    if not data:
        raise InvalidInput(f"{label}: the image is empty")
    if len(data) > max_bytes:
        raise TooLarge(f"{label}: {len(data)} bytes is over the limit of {max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
            width, height = probe.size
    except Image.DecompressionBombError:
        raise TooLarge(
            f"{label}: the image has too many pixels (limit {max_pixels})", code="too_many_pixels"
        ) from None
    except UnidentifiedImageError:
        raise UnsupportedMedia(
            f"{label}: not an image in a supported format ({', '.join(FORMATS)})",
            code="not_an_image",
        ) from None
    except (OSError, SyntaxError, ValueError):
        raise BadContent(f"{label}: corrupt image header") from None
    if width * height > max_pixels:
        raise TooLarge(
            f"{label}: {width}x{height} is over the limit of {max_pixels} pixels",
            code="too_many_pixels",
        )
    try:
        check_aspect_ratio(width, height, max_aspect_ratio)
    except ValueError as exc:
        raise InvalidInput(f"{label}: {exc}", "extreme_aspect_ratio") from None


def image_to_pixels(
    data: bytes,
    spec: ImageSpec,
    max_bytes: int,
    max_pixels: int,
    max_aspect_ratio: float,
    label: str,
) -> np.ndarray:
    """Checked bytes -> (3, S, S) float32 with the bundle's preprocessing."""
    check_image(data, max_bytes, max_pixels, max_aspect_ratio, label)
    try:
        image = load_image_for(data, spec, max_aspect_ratio)
    except ValueError:
        raise BadContent(f"{label}: the image data is truncated or corrupt") from None
    return preprocess_image(image, spec)
