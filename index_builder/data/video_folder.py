"""A folder of videos with sidecar `.txt` captions of the same stem (as `folder` for images)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from index_builder.data.common import (
    ImportResult,
    Skips,
    fingerprint,
    path_id,
    progress,
    run_import,
)
from index_builder.data.folder import sidecar_captions
from index_builder.manifest import Record, split_of
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


def video_problem(path: Path) -> str | None:
    """Why a video file cannot be used (its header checks), or None; nothing is decoded."""
    try:
        probe_video(path)
    except VideoError as exc:
        return f"unusable video ({exc.code})"
    except OSError:
        return "unreadable video"
    return None


def import_video_folder(cfg: VideoFolderConfig, out: str | Path) -> ImportResult:
    root = Path(cfg.path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"video folder not found: {root}")
    videos = find_videos(root)
    if not videos:
        raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {root}")
    sidecars = [p.with_suffix(".txt") for p in videos if p.with_suffix(".txt").is_file()]
    fp = fingerprint("video-folder", {"root": str(root), "version": VERSION}, [*videos, *sidecars])
    info = {"name": Path(out).name, "source": "video-folder", "media": "video", "root": str(root)}

    def produce(skips: Skips) -> Iterator[Record]:
        seen: set[str] = set()
        for video in progress(videos, "video-folder"):
            rel = video.relative_to(root).with_suffix("").as_posix()
            rid = path_id("video", rel)
            captions = sidecar_captions(video)
            if isinstance(captions, str):
                problem: str | None = captions
            elif rid in seen:
                problem = "another video with the same name"
            else:
                problem = video_problem(video)
            if problem:
                skips.add(problem, str(video.relative_to(root)))
                continue
            seen.add(rid)
            yield Record(rid, str(video), tuple(captions), split_of(rel), {"file": rel})

    return run_import(out, info, fp, produce)
