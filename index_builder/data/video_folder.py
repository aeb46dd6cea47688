"""A folder of videos with sidecar `.txt` captions of the same stem (as `folder` for images)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from index_builder.data.common import (
    ImportResult,
)
from index_builder.data.folder import import_files
from index_builder.video import VIDEO_EXTENSIONS, VideoError, probe_video

VERSION = 1


@dataclass(frozen=True)
class VideoFolderConfig:
    path: str


def find_videos(root: Path) -> list[Path]:
    """Every video under `root` (recursively), in path order."""
    found = [
        Path(dirpath) / name
        for dirpath, _, names in os.walk(root)
        for name in names
        if name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith(".")
    ]
    return sorted(found)


def read_video(path: Path) -> tuple[str, str | None]:
    """(SHA-1 of the file's bytes: its split key, why it cannot be used or None). Only the
    container is checked (`probe_video`): decoding every frame would dominate the import."""
    if not path.is_file():
        return "", "missing video"
    try:
        data = path.read_bytes()
    except OSError:
        return "", "unreadable video"
    try:
        probe_video(data)
    except VideoError as exc:
        return "", f"unusable video ({exc.code})"
    return hashlib.sha1(data).hexdigest(), None


def import_video_folder(cfg: VideoFolderConfig, out: str | Path) -> ImportResult:
    root = Path(cfg.path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"video folder not found: {root}")
    videos = find_videos(root)
    if not videos:
        raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {root}")
    names = ("video-folder", "video", "video")
    info = {"media": "video"}
    return import_files(root, videos, read_video, out, names, VERSION, info, VIDEO_EXTENSIONS)
