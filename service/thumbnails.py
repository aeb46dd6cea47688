"""Thumbnails of gallery images: JPEG bytes made on first request and kept in a small LRU."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from index_builder.preprocess import load_image


def make_thumbnail(path: Path, size: int) -> bytes:
    """The image scaled to fit `size` x `size` (never enlarged), alpha flattened on white."""
    image = load_image(path)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()


class ThumbnailCache:
    """Thread-safe LRU keyed by (path, mtime, size): a rebuilt gallery file is never stale."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, size: int) -> bytes:
        key = (str(path), path.stat().st_mtime_ns, size)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = make_thumbnail(path, size)
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return data
