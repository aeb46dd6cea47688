"""Images uploaded through the admin API, kept under the index root by content so that they
outlive the index versions that point at them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from index_builder.atomic import atomic_write_bytes

FILES = "files"
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}


def store_upload(root: Path, data: bytes, fmt: str) -> Path:
    """`root/files/<sha256><suffix>`, written atomically once; the same bytes share a file."""
    path = root / FILES / f"{hashlib.sha256(data).hexdigest()}{SUFFIXES.get(fmt, '.tiff')}"
    if not path.is_file():
        atomic_write_bytes(path, data)
    return path
