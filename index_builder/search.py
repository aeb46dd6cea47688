"""Search without HTTP: one index version and the encoders of its bundle (the service wraps
this with micro-batching and hot swaps).

    from index_builder.search import Searcher
    searcher = Searcher.open("cots-data/index")
    for hit in searcher.text_to_image("a red apple", k=5, filter={"folder": "food"}):
        print(hit["id"], hit["score"], hit["meta"])

Every query costs one tower pass and one index search: text-to-image and image-to-image
search the image side, image-to-text and text-to-text the text side. Videos are items of the
image side (`index_builder.video_index`): text-to-video searches it for rows whose `media` is
"video", and video-to-text encodes the video's sampled frames and pools them (a video bundle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from index_builder.backends import open_store
from index_builder.backends.base import Hit, Store, Version
from index_builder.bundle import Bundle
from index_builder.encoders import Encoders
from index_builder.preprocess import load_image, preprocess_image
from index_builder.video import VideoLimits, decode_video, video_pixels
from index_builder.video_index import MEDIA

ImageInput = bytes | str | Path | Image.Image | np.ndarray


class SideMissing(LookupError):
    """The index version has no rows of the side a search needs."""


class Searcher:
    """An index version and the encoders of the bundle that built it."""

    def __init__(self, index: Version, encoders: Encoders) -> None:
        index.check_bundle(encoders.bundle)
        self.index = index
        self.encoders = encoders

    @classmethod
    def open(
        cls,
        root: str | Path | Store,
        bundle: str | Path | Bundle | None = None,
        version: str | None = None,
        threads: int | None = None,
    ) -> Searcher:
        """The version CURRENT names (or `version`) under an index root or in a store of any
        backend (`index_builder.backends.open_store`), with `bundle` or else the bundle the
        version records; a bundle that did not build the index is refused."""
        store = open_store(root) if isinstance(root, str | Path) else root
        info = store.read_info(version)
        if bundle is None:
            if not info.get("bundle_path"):
                raise ValueError(f"index version {info['version']} records no bundle; pass one")
            bundle = info["bundle_path"]
        if not isinstance(bundle, Bundle):
            bundle = Bundle.load(bundle)
        index = store.open(info["version"], bundle=bundle)
        return cls(index, Encoders.open(bundle, threads=threads))

    @property
    def bundle(self) -> Bundle:
        return self.encoders.bundle

    @property
    def version(self) -> str:
        return self.index.version

    # -- building blocks (the service uses these) ------------------------------------------

    def require(self, side: str) -> None:
        if not self.index.has(side):
            what = "images" if side == "image" else "texts"
            raise SideMissing(f"index version {self.version} holds no {what}")

    def require_videos(self) -> None:
        """The index holds videos and the bundle can encode them, else SideMissing."""
        fields = self.index.info["sides"].get("image", {}).get("fields", {})
        if "media" not in fields or self.bundle.video_spec is None:
            raise SideMissing(f"index version {self.version} holds no videos")

    def video_filter(self, filter: dict[str, Any] | None) -> dict[str, Any]:
        """`filter` restricted to the image side's videos."""
        return {**(filter or {}), "media": MEDIA}

    def video_query(
        self, video: bytes | str | Path, limits: VideoLimits = VideoLimits()
    ) -> tuple[np.ndarray, np.ndarray]:
        """A video file or bytes -> (pixels (N, 3, S, S), mask (N,)) with the bundle's video
        and image specs (a `VideoError` for a video that cannot be used)."""
        self.require_videos()
        spec = self.bundle.video_spec
        assert spec is not None
        clip = decode_video(video, spec.frames, limits)
        return video_pixels(clip.frames, self.bundle.image_spec, spec.frames)

    def pixels(self, image: ImageInput) -> np.ndarray:
        """Any image input -> (3, S, S) pixels with the bundle's preprocessing."""
        if isinstance(image, np.ndarray):
            return image
        spec = self.bundle.image_spec
        decoded = image if isinstance(image, Image.Image) else load_image(image, spec.background)
        return preprocess_image(decoded.convert("RGB"), spec)

    def find(
        self,
        side: str,
        vectors: np.ndarray,
        k: int = 10,
        offset: int = 0,
        filter: dict[str, Any] | None = None,
        exclude: int | None = None,
    ) -> list[list[Hit]]:
        """The hits ranked offset+1 .. offset+k on `side` for each query vector, filtered by
        metadata, each with its stored row (read by the search itself); `exclude` leaves out
        one row (the item itself, for "more like this")."""
        self.require(side)
        return self.index.find(side, vectors, k, offset=offset, filter=filter, exclude=exclude)

    def search(
        self,
        side: str,
        vectors: np.ndarray,
        k: int = 10,
        offset: int = 0,
        filter: dict[str, Any] | None = None,
        exclude: int | None = None,
    ) -> list[list[dict[str, Any]]]:
        """`find`'s hits as hit dicts (`hit`)."""
        found = self.find(side, vectors, k, offset, filter, exclude)
        return [[self.hit(side, hit) for hit in hits] for hits in found]

    @staticmethod
    def hit(side: str, found: Hit) -> dict[str, Any]:
        """One hit from its stored row: id, score (cosine, clipped to [-1, 1]), rank,
        metadata and the side's content (captions of an image; the text, and the image it
        describes, of a text)."""
        item = found.item
        hit: dict[str, Any] = {
            "id": str(item["id"]),
            "score": min(1.0, max(-1.0, found.score)),
            "rank": found.rank,
            "meta": item.get("meta") or {},
        }
        if side == "image":
            hit["captions"] = list(item.get("captions") or [])
        else:
            hit["text"] = str(item["text"])
            if item.get("image_id") is not None:
                hit["image_id"] = str(item["image_id"])
        return hit

    def image_path(self, image_id: str) -> Path:
        """The server file of a gallery image (KeyError for an id the index does not hold)."""
        row = self.index.row_of("image", image_id) if self.index.has("image") else None
        if row is None:
            raise KeyError(f"no gallery image with id {image_id!r}")
        return Path(self.index.rows_at("image", [row])[0]["image"])

    def find_similar(
        self,
        side: str,
        item_id: str,
        k: int = 10,
        offset: int = 0,
        filter: dict[str, Any] | None = None,
    ) -> list[Hit]:
        """More like this: the nearest items of `side` to a stored item (itself left out)."""
        self.require(side)
        row = self.index.row_of(side, item_id)
        if row is None:
            raise KeyError(f"no {side} with id {item_id!r} in index version {self.version}")
        vector = self.index.vector(side, row)[None]
        return self.find(side, vector, k, offset, filter, exclude=row)[0]

    def similar(
        self,
        side: str,
        item_id: str,
        k: int = 10,
        offset: int = 0,
        filter: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """`find_similar`'s hits as hit dicts."""
        return [self.hit(side, hit) for hit in self.find_similar(side, item_id, k, offset, filter)]

    # -- the four searches -----------------------------------------------------------------

    def text_to_image(self, text: str | list[str], k: int = 10, offset: int = 0, filter=None):
        return self._run("text", "image", text, k, offset, filter)

    def image_to_text(self, image: Any, k: int = 10, offset: int = 0, filter=None):
        return self._run("image", "text", image, k, offset, filter)

    def image_to_image(self, image: Any, k: int = 10, offset: int = 0, filter=None):
        return self._run("image", "image", image, k, offset, filter)

    def text_to_text(self, text: str | list[str], k: int = 10, offset: int = 0, filter=None):
        return self._run("text", "text", text, k, offset, filter)

    def text_to_video(self, text: str | list[str], k: int = 10, offset: int = 0, filter=None):
        self.require_videos()
        return self._run("text", "image", text, k, offset, self.video_filter(filter))

    def video_to_text(self, video: Any, k: int = 10, offset: int = 0, filter=None):
        """A video file path or bytes (or a list of them) -> caption hits."""
        return self._run("video", "text", video, k, offset, filter)

    def _run(self, modality: str, side: str, query: Any, k: int, offset: int, filter: Any):
        self.require(side)
        single = not isinstance(query, list)
        queries = [query] if single else query
        if modality == "image":
            queries = [self.pixels(q) for q in queries]
        if modality == "video":
            queries = [self.video_query(q) for q in queries]
        vectors = self.encoders.encode(modality, queries)
        found = self.search(side, vectors, k, offset, filter)
        return found[0] if single else found
