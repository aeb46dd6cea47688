"""The one dataset format: a directory with `manifest.jsonl`, `dataset.json` and `images/`.

Each manifest line is one image with all of its captions:

    {"id": "oca-00042", "image": "images/oca-00042.png", "captions": ["a red apple", ...],
     "split": "train", "meta": {"source": "..."}}

`image` is relative to the dataset directory (absolute paths are allowed for imports that
reference images in place). `dataset.json` describes the whole: name, source, counts per
split, and the fingerprint of the import that produced it.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from index_builder.atomic import atomic_open, atomic_write_json, read_json

MANIFEST = "manifest.jsonl"
INFO = "dataset.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One gallery item: an image and the captions that describe it."""

    id: str
    image: str
    captions: tuple[str, ...]
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.id, str):
            raise ValueError(f"record id must be a non-empty string, got {self.id!r}")
        if not self.image:
            raise ValueError(f"record {self.id!r} has no image path")
        captions = tuple(c.strip() for c in self.captions if isinstance(c, str) and c.strip())
        if not captions:
            raise ValueError(f"record {self.id!r} has no non-empty caption")
        object.__setattr__(self, "captions", captions)
        if self.split not in SPLITS:
            raise ValueError(
                f"record {self.id!r} has split {self.split!r}, expected one of {SPLITS}"
            )

    def to_json(self) -> str:
        obj: dict[str, Any] = {
            "id": self.id,
            "image": self.image,
            "captions": list(self.captions),
            "split": self.split,
        }
        if self.meta:
            obj["meta"] = self.meta
        return json.dumps(obj, ensure_ascii=False)

    @classmethod
    def from_obj(cls, obj: Any) -> Record:
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - {"id", "image", "captions", "split", "meta"}
        if unknown:
            raise ValueError(f"unknown manifest keys {sorted(unknown)}")
        captions = obj.get("captions")
        if isinstance(captions, str):
            captions = [captions]
        return cls(
            id=str(obj.get("id", "")),
            image=str(obj.get("image", "")),
            captions=tuple(captions or ()),
            split=str(obj.get("split", "train")),
            meta=dict(obj.get("meta") or {}),
        )


def manifest_path(dataset: str | Path) -> Path:
    """Accept a dataset directory or a manifest file; return the manifest file."""
    path = Path(dataset)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no dataset manifest at {path} (build one with `cots data`)")
    return path


def dataset_root(dataset: str | Path) -> Path:
    return manifest_path(dataset).parent


def read_manifest(dataset: str | Path, split: str | None = None) -> Iterator[Record]:
    """Stream records (optionally one split) without loading the file into memory."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
    path = manifest_path(dataset)
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = Record.from_obj(json.loads(line))
            except (json.JSONDecodeError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: bad manifest line: {exc}") from None
            if split is None or record.split == split:
                yield record


def load_records(dataset: str | Path, split: str | None = None) -> list[Record]:
    return list(read_manifest(dataset, split))


def image_path(dataset: str | Path, record: Record) -> Path:
    """Absolute path of a record's image."""
    path = Path(record.image)
    return path if path.is_absolute() else dataset_root(dataset) / path


def write_manifest(root: str | Path, records: Iterable[Record], info: dict[str, Any]) -> dict:
    """Write manifest and description atomically; ids must be unique. Returns the description."""
    root = Path(root)
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    n_captions = 0
    with atomic_open(root / MANIFEST, "w") as handle:
        for record in records:
            if record.id in seen:
                raise ValueError(f"duplicate record id {record.id!r}")
            seen.add(record.id)
            counts[record.split] += 1
            n_captions += len(record.captions)
            handle.write(record.to_json() + "\n")
        if not seen:  # raising inside the block keeps any previous manifest in place
            raise ValueError(f"no usable records for the dataset at {root}")
    description = {
        **info,
        "count": sum(counts.values()),
        "captions": n_captions,
        "splits": {s: counts.get(s, 0) for s in SPLITS},
    }
    atomic_write_json(root / INFO, description)
    return description


def move_splits(root: str | Path, moves: dict[str, str]) -> dict[str, int]:
    """Rewrite the manifest with the records named in `moves` in their new split (atomic);
    returns the count per split."""
    counts: Counter[str] = Counter()
    with atomic_open(Path(root) / MANIFEST, "w") as handle:
        for record in read_manifest(root):
            if record.id in moves:
                record = dataclasses.replace(record, split=moves[record.id])
            counts[record.split] += 1
            handle.write(record.to_json() + "\n")
    return {s: counts.get(s, 0) for s in SPLITS}


def read_info(dataset: str | Path) -> dict[str, Any]:
    """The dataset description, or {} for a bare manifest without one."""
    path = dataset_root(dataset) / INFO
    return read_json(path) if path.is_file() else {}
