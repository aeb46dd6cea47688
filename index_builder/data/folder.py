"""A folder of images whose captions sit in sidecar `.txt` files of the same stem, one per line."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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


SIDECARS = (".txt", ".json")  # captions, metadata: read with the image of the same stem


def other_files(root: Path, media: tuple[str, ...]) -> list[Path]:
    """The files under `root` that are neither `media` nor sidecars (a stray notes.pdf): they
    are not read, but counted and named, so that nothing is left out without a word."""
    return sorted(
        Path(dirpath) / name
        for dirpath, _, names in os.walk(root)
        for name in names
        if not name.lower().endswith((*media, *SIDECARS)) and not name.startswith(".")
    )


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
    return import_files(root, images, read_image, out, ("folder", "folder", "image"), VERSION)


def import_files(
    root: Path,
    files: list[Path],
    read: Callable[[Path], tuple[str, str | None]],
    out: str | Path,
    names: tuple[str, str, str],
    version: int,
    info: dict[str, str] | None = None,
    media: tuple[str, ...] = IMAGE_EXTENSIONS,
) -> ImportResult:
    """The files under `root` with their sidecar captions as records: `read(file)` gives the
    file's split key (a hash of its bytes) or why it cannot be used. `names`: the source's name,
    the prefix of its ids (`<prefix>.<path>`) and what a file is ("image", "video")."""
    source, prefix, noun = names
    sidecars = [p.with_suffix(".txt") for p in files if p.with_suffix(".txt").is_file()]
    fp = fingerprint(source, {"root": str(root), "version": version}, [*files, *sidecars])
    described = {"name": Path(out).name, "source": source, "root": str(root), **(info or {})}

    def produce(skips: Skips, splits: Splits) -> Iterator[Record]:
        article = "an" if noun[0] in "aeiou" else "a"
        for other in other_files(root, media):
            skips.add(f"not {article} {noun}", other.relative_to(root).as_posix())
        seen: set[str] = set()
        for file in progress(files, source):
            rel = file.relative_to(root).with_suffix("").as_posix()
            rid = path_id(prefix, rel)
            captions = sidecar_captions(file)
            digest = ""
            if isinstance(captions, str):
                problem: str | None = captions
            elif rid in seen:
                problem = f"another {noun} with the same name"
            else:
                digest, problem = read(file)
            if problem:
                skips.add(problem, str(file.relative_to(root)))
                continue
            seen.add(rid)
            split = splits.assign(rid, digest)
            yield Record(rid, str(file), tuple(captions), split, {"file": rel})

    return run_import(out, described, fp, produce)
