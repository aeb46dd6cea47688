"""COCO captions JSON and the Karpathy split JSON (Flickr30K / MSCOCO retrieval benchmarks)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index_builder.data.common import (
    ImportResult,
    Skips,
    Splits,
    fingerprint,
    load_json_input,
    progress,
    read_image,
    run_import,
)
from index_builder.manifest import SPLITS, Record

VERSION = 2  # 2: full decode, split by content, duplicate image ids refused
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@dataclass(frozen=True)
class CocoConfig:
    annotations: str  # captions_*.json
    images: str  # the directory holding the file_name entries
    split: str = "auto"  # train / val / test for every image, or auto: the shared split rule


@dataclass(frozen=True)
class KarpathyConfig:
    annotations: str  # dataset_flickr30k.json / dataset_coco.json
    images: str  # root that filepath/filename are relative to


def _check_split(split: str) -> None:
    if split != "auto" and split not in SPLITS:
        raise ValueError(f"--split must be auto or one of {', '.join(SPLITS)}, got {split!r}")


def _images_dir(images: str) -> Path:
    root = Path(images).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image directory not found: {root}")
    return root


def coco_captions(data: Any, path: Path, skips: Skips) -> dict[Any, tuple[str, list[str]]]:
    """image id -> (file name, captions), with row-level problems counted in `skips`.

    An image entry repeated with the same file is merged; an id given to different files
    cannot say which file its captions describe, so all of its entries and captions are
    skipped.
    """
    if not (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations"), list)
    ):
        raise ValueError(
            f"{path} is not a COCO captions file (expected 'images' and 'annotations' lists)"
        )
    files: dict[Any, str] = {}
    ambiguous: set[Any] = set()
    for n, entry in enumerate(data["images"]):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("id"), int | str)
            or not entry.get("file_name")
        ):
            skips.add("malformed image entry", f"images[{n}]")
            continue
        image_id, name = entry["id"], str(entry["file_name"])
        known = files.get(image_id)
        if known is None:
            files[image_id] = name
            continue
        if known == name:
            skips.merge("repeated image entry")
            continue
        if image_id not in ambiguous:  # the first entry goes too
            skips.add("image id shared by different files", f"image id {image_id!r}: {known}")
            ambiguous.add(image_id)
        skips.add("image id shared by different files", f"images[{n}]: {name}")
    captions: dict[Any, list[str]] = defaultdict(list)
    for n, ann in enumerate(data["annotations"]):
        text = ann.get("caption") if isinstance(ann, dict) else None
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not isinstance(text, str) or not text.strip():
            skips.add("empty or malformed caption", f"annotations[{n}]")
        elif not isinstance(image_id, int | str) or image_id not in files:
            skips.add("caption of an unknown image", f"annotations[{n}]")
        elif image_id in ambiguous:
            skips.add("caption of an image id shared by different files", f"annotations[{n}]")
        else:
            captions[image_id].append(" ".join(text.split()))
    return {
        image_id: (name, captions.get(image_id, []))
        for image_id, name in files.items()
        if image_id not in ambiguous
    }


def import_coco(cfg: CocoConfig, out: str | Path) -> ImportResult:
    _check_split(cfg.split)
    path = Path(cfg.annotations)
    data = load_json_input(path, "COCO captions file")
    root = _images_dir(cfg.images)
    fp = fingerprint("coco", {"images": str(root), "split": cfg.split, "version": VERSION}, [path])
    info = {"name": Path(out).name, "source": "coco", "annotations": str(path.resolve())}

    def produce(skips: Skips, splits: Splits) -> Iterator[Record]:
        table = coco_captions(data, path, skips)
        for image_id, (name, captions) in progress(table.items(), "coco", len(table)):
            rid = f"coco.{image_id}"
            yield from _record(rid, root / name, captions, cfg.split, skips, splits)

    return run_import(out, info, fp, produce)


def _record(
    rid: str, image: Path, captions: list[str], split: str, skips: Skips, splits: Splits
) -> Iterator[Record]:
    """The record of one image, its split from the source or (`auto`) the shared rule."""
    digest, problem = ("", "image without captions") if not captions else read_image(image)
    if problem:
        skips.add(problem, str(image))
        return
    split = splits.assign(rid, digest) if split == "auto" else split
    yield Record(rid, str(image), tuple(captions), split)


def karpathy_rows(data: Any, path: Path) -> tuple[str, list]:
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)):
        raise ValueError(f"{path} is not a Karpathy split file (expected an 'images' list)")
    return str(data.get("dataset") or path.stem), data["images"]


def import_karpathy(cfg: KarpathyConfig, out: str | Path) -> ImportResult:
    path = Path(cfg.annotations)
    data = load_json_input(path, "Karpathy split file")
    root = _images_dir(cfg.images)
    dataset, rows = karpathy_rows(data, path)
    fp = fingerprint("karpathy", {"images": str(root), "version": VERSION}, [path])
    info = {"name": Path(out).name, "source": "karpathy", "dataset": dataset}

    def produce(skips: Skips, splits: Splits) -> Iterator[Record]:
        seen: set[str] = set()
        for n, row in enumerate(progress(rows, "karpathy")):
            parsed = _karpathy_row(row, root)
            if isinstance(parsed, str):
                skips.add(parsed, f"images[{n}]")
                continue
            image, captions, split = parsed
            rid = f"{dataset}.{Path(row['filename']).stem}"
            if rid in seen:
                skips.add("duplicate file name", f"images[{n}]")
                continue
            seen.add(rid)
            yield from _record(rid, image, captions, split, skips, splits)

    return run_import(out, info, fp, produce)


def _karpathy_row(row: Any, root: Path) -> tuple[Path, list[str], str] | str:
    """(image path, captions, split: `auto` when the row has none) or why it is unusable."""
    if not isinstance(row, dict) or not row.get("filename"):
        return "malformed image entry"
    given = row.get("split")
    split = KARPATHY_SPLITS.get(str(given)) if given else "auto"
    if split is None:
        return f"unknown split {given!r}"
    sentences = row.get("sentences") or []
    captions = [
        " ".join(s["raw"].split())
        for s in sentences
        if isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip()
    ]
    image = root / str(row.get("filepath") or "") / str(row["filename"])
    if not image.is_file() and (root / str(row["filename"])).is_file():
        image = root / str(row["filename"])  # all images in one folder, filepath ignored
    return image, captions, split
