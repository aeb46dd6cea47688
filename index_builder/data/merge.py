"""`cots data merge`: one gallery made of several, each record tagged with its gallery.

The merged manifest points at the source galleries' images in place (relative paths when the
galleries sit side by side, absolute otherwise): nothing is copied. Each record keeps its
split and gains `meta.gallery`, which training reads for per-gallery sampling weights and
per-gallery metrics (training/sources.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from index_builder.data.common import ImportResult, Skips, fingerprint, run_import
from index_builder.manifest import Record, image_path, manifest_path, read_info, read_manifest

GALLERY_KEY = "gallery"


@dataclass(frozen=True)
class MergeConfig:
    galleries: tuple[tuple[str, Path], ...]  # (name, dataset directory)

    def __post_init__(self) -> None:
        names = [name for name, _ in self.galleries]
        if len(self.galleries) < 2:
            raise ValueError("merge needs at least two galleries (NAME=DIR ...)")
        if len(set(names)) != len(names):
            raise ValueError(f"gallery names must differ, got {', '.join(names)}")
        for _, path in self.galleries:
            manifest_path(path)  # FileNotFoundError naming the missing dataset


def import_merge(cfg: MergeConfig, out: Path) -> ImportResult:
    out = Path(out)
    manifests = [manifest_path(path) for _, path in cfg.galleries]
    options = {"galleries": [name for name, _ in cfg.galleries], "out": str(out.resolve()), "v": 2}
    fp = fingerprint("merge", options, manifests)
    info = {
        "name": out.name,
        "source": "merge",
        "galleries": options["galleries"],
        "dirs": {name: _relative(Path(path), out) for name, path in cfg.galleries},
    }
    return run_import(out, info, fp, lambda skips, splits: _records(cfg, out, skips))


def _records(cfg: MergeConfig, out: Path, skips: Skips) -> Iterator[Record]:
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for name, path in cfg.galleries:
        for record in read_manifest(path):
            if record.id in seen:
                skips.add("id already taken by an earlier gallery", record.id)
                continue
            seen.add(record.id)
            yield dataclasses.replace(
                record,
                image=_relative(image_path(path, record), out),
                meta={**record.meta, GALLERY_KEY: name},
            )


def _relative(path: Path, out: Path) -> str:
    path = path.resolve()
    try:
        return os.path.relpath(path, out.resolve())
    except ValueError:  # another drive
        return str(path)


def merged_galleries(dataset: str | Path) -> list[Path] | None:
    """The galleries a merged dataset was made of, in order, when its records are exactly
    theirs (none skipped); None for any other dataset."""
    root = manifest_path(dataset).parent
    info = read_info(root)
    if info.get("source") != "merge" or info.get("skipped") or not info.get("dirs"):
        return None
    return [(root / info["dirs"][name]).resolve() for name in info["galleries"]]
