"""Videos in an index: a video is an item of the image side with one vector per video.

A gallery row whose `image` is a video file becomes a video row when it is embedded:

    {"id", "video": <the video file>, "image": <its keyframe strip (JPEG)>,
     "keyframes": [<one JPEG per sampled frame>], "captions", "meta": {..., "media": "video"}}

so search, metadata filters (`{"media": "video"}` selects videos), "more like this", live
changes, thumbnails and `/images/{id}` (the strip) work for videos as for images. The
keyframes are the frames the bundle's `VideoSpec` samples, written while the video is
embedded under `<index root>/files/keyframes/<key>/` (`strip.jpg`, `0.jpg`, `1.jpg`, ...), where
the key hashes the video file's path, size and time and the frame count.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.bundle import Bundle
from index_builder.encoders import ImageEncoder, VideoEncoder
from index_builder.progress import progress
from index_builder.video import (
    VideoError,
    VideoLimits,
    decode_video,
    is_video_path,
    save_keyframes,
    video_pixels,
)

log = logging.getLogger(__name__)
MEDIA = "video"


def is_video_row(row: dict[str, Any]) -> bool:
    return "video" in row


def video_rows(rows: list[dict[str, Any]], files_dir: Path, bundle: Bundle) -> list[dict[str, Any]]:
    """Image rows whose file is a video, as video rows (see the module docstring); other rows
    unchanged. A video gallery needs a video bundle (ValueError)."""
    if not any(is_video_path(row["image"]) for row in rows if not is_video_row(row)):
        return rows
    if bundle.video_spec is None:
        raise ValueError(
            f"the gallery holds videos but bundle {bundle.bundle_id} is an image bundle; "
            "export a video checkpoint (e.g. a cots-video-cpu run)"
        )
    frames = bundle.video_spec.frames
    return [_as_video(row, files_dir, frames) for row in rows]


def _as_video(row: dict[str, Any], files_dir: Path, frames: int) -> dict[str, Any]:
    if is_video_row(row) or not is_video_path(row["image"]):
        return row
    video = Path(row["image"])
    stat = video.stat() if video.is_file() else None
    stamp = f"{video.resolve()}\0{stat.st_size if stat else 0}\0{stat.st_mtime_ns if stat else 0}"
    key = hashlib.sha256(f"{stamp}\0{frames}".encode()).hexdigest()[:24]
    folder = (files_dir / "keyframes" / key).resolve()
    return {
        **row,
        "video": str(video),
        "image": str(folder / "strip.jpg"),
        "keyframes": [],
        "meta": {**(row.get("meta") or {}), "media": MEDIA},
    }


def finish_video_rows(rows: list[dict[str, Any]]) -> None:
    """Record the keyframe files the embedding wrote in each video row (in place)."""
    for row in rows:
        if is_video_row(row):
            folder = Path(row["image"]).parent
            count = sum(1 for p in folder.glob("*.jpg") if p.stem.isdigit())
            row["keyframes"] = [str(folder / f"{i}.jpg") for i in range(count)]


class MediaEmbedder:
    """Encodes a shard's rows of the image side: images through the image encoder, videos
    through the video encoder (decoded within `limits`, keyframes written on the way).
    A row that cannot be decoded gets a zero vector and is reported to `skip(id, reason)`."""

    def __init__(
        self,
        bundle: Bundle,
        image_encoder: ImageEncoder,
        read_images: Callable[[list[dict]], np.ndarray],
        limits: VideoLimits = VideoLimits(),
    ) -> None:
        self.video = VideoEncoder(bundle, image_encoder)
        self.image, self.read_images, self.limits = image_encoder, read_images, limits

    def embed(self, rows: list[dict], skip: Callable[[str, str], None]) -> np.ndarray:
        out = np.zeros((len(rows), self.video.bundle.embed_dim), np.float32)
        images = [i for i, row in enumerate(rows) if not is_video_row(row)]
        if images:
            out[images] = self.image.encode_pixels(self.read_images([rows[i] for i in images]))
        videos = [i for i, row in enumerate(rows) if is_video_row(row)]
        for i in progress(videos, desc="embed videos", unit="video", leave=False):
            embedded = self._video(rows[i], skip)
            if embedded is not None:
                out[i] = embedded
        return out

    def _video(self, row: dict, skip: Callable[[str, str], None]) -> np.ndarray | None:
        try:
            clip = decode_video(row["video"], self.video.spec.frames, self.limits)
        except (VideoError, OSError) as exc:
            log.warning("skipping gallery video %r: %s", row["id"], exc)
            skip(row["id"], str(exc).splitlines()[0])
            return None
        save_keyframes(clip.frames, Path(row["image"]).parent)
        pixels, mask = video_pixels(clip.frames, self.image.spec, self.video.spec.frames)
        return self.video.encode_pixels(pixels[None], mask[None])[0]
