"""Untrusted image bytes: base64, byte, pixel and shape limits checked before decoding, safe
formats only, the bundle's preprocessing, and memory given back after a large decode."""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import io
import re
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from index_builder.preprocess import (
    ImageSpec,
    check_aspect_ratio,
    load_image_for,
    preprocess_image,
)
from service.errors import BadContent, InvalidInput, TooLarge, UnsupportedMedia
from service.metrics import Metrics
from service.settings import Settings

# Formats decoded by Pillow itself; EPS (Ghostscript) and friends are never opened.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
EXTENSIONS = {
    "PNG": "png",
    "JPEG": "jpg",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
}
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
) -> str:
    """Read only the header: refuse non-images, unsafe formats, oversized dimensions and
    extreme shapes; returns the format ("PNG", "JPEG"...)."""
    if not data:
        raise InvalidInput(f"{label}: the image is empty")
    if len(data) > max_bytes:
        raise TooLarge(f"{label}: {len(data)} bytes is over the limit of {max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
            width, height = probe.size
            fmt = str(probe.format)
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
    return fmt


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
    pixels = preprocess_image(image, spec)
    image.close()
    release_after(image)
    return pixels


def images_to_pixels(
    names: list[str], payloads: list[bytes], spec: ImageSpec, settings: Settings, metrics: Metrics
) -> list[np.ndarray]:
    """Each upload checked and preprocessed with `spec` (the bundle that will encode it)."""
    pixels = []
    for name, data in zip(names, payloads, strict=True):
        with metrics.timed("decode", "image"):
            pixels.append(
                image_to_pixels(
                    data,
                    spec,
                    settings.max_image_bytes,
                    settings.max_image_pixels,
                    settings.max_aspect_ratio,
                    name,
                )
            )
    return pixels


LARGE_DECODE_PIXELS = 4_000_000  # decoded, about 50 MB with Pillow's and our copies


def decodes_large(payloads: list[bytes]) -> bool:
    """Whether an upload decodes to LARGE_DECODE_PIXELS or more, read from its header (a
    JPEG decodes at a reduced scale, so never does). Such decodes run in the bounded decode
    pool: sixteen maximum-size PNGs decoded at once held 3.9 GB and stalled the event loop
    (bench/attack.py). An unreadable header is not large: the checks that follow refuse it."""
    for data in payloads:
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
                width, height = probe.size
                if probe.format != "JPEG" and width * height >= LARGE_DECODE_PIXELS:
                    return True
        except (
            Image.DecompressionBombError,
            UnidentifiedImageError,
            OSError,
            SyntaxError,
            ValueError,
        ):
            continue
    return False


def release_after(image: Image.Image) -> None:
    """Give the heap back to the system after a large decode: glibc keeps the freed memory,
    so the resident size after the largest allowed image (+490 MB) never came back down."""
    if image.width * image.height >= LARGE_DECODE_PIXELS:
        release_memory()


def release_memory() -> None:
    """`malloc_trim(0)` where the C library has it (glibc); elsewhere nothing."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
