"""A folder of images whose captions sit in sidecar `.txt` files of the same stem, one per line."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from index_builder.data.common import (
    IMAGE_EXTENSIONS,
    ImportResult,
    Skips,
    Splits,
    fingerprint,
    path_id,
    progress,
    read_image,
    run_import,
)
from index_builder.manifest import Record

VERSION = 2  # 2: full decode, split by content


@dataclass(frozen=True)
class FolderConfig:
    path: str


def find_images(root: Path) -> list[Path]:
    """Every image under `root` (recursively), in path order."""
    found = [
        Path(dirpath) / name
        for dirpath, _, names in os.walk(root)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
    ]
    return sorted(found)


def sidecar_captions(image: Path) -> list[str] | str:
    """The non-empty lines of `<stem>.txt`, or the reason there are none."""
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return "no sidecar .txt"
    try:
        lines = sidecar.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return "unreadable sidecar .txt"
    captions = [" ".join(line.split()) for line in lines if line.strip()]
    return captions or "empty caption"


def import_folder(cfg: FolderConfig, out: str | Path) -> ImportResult:
    root = Path(cfg.path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    images = find_images(root)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    sidecars = [p.with_suffix(".txt") for p in images if p.with_suffix(".txt").is_file()]
    fp = fingerprint("folder", {"root": str(root), "version": VERSION}, [*images, *sidecars])
    info = {"name": Path(out).name, "source": "folder", "root": str(root)}

    def produce(skips: Skips, splits: Splits) -> Iterator[Record]:
        seen: set[str] = set()
        for image in progress(images, "folder"):
            rel = image.relative_to(root).with_suffix("").as_posix()
            rid = path_id("folder", rel)
            captions = sidecar_captions(image)
            digest = ""
            if isinstance(captions, str):
                problem: str | None = captions
            elif rid in seen:
                problem = "another image with the same name"
            else:
                digest, problem = read_image(image)
            if problem:
                skips.add(problem, str(image.relative_to(root)))
                continue
            seen.add(rid)
            split = splits.assign(rid, digest)
            yield Record(rid, str(image), tuple(captions), split, {"file": rel})

    return run_import(out, info, fp, produce)
