"""Where index rows come from: any image source and any text source, each side on its own.

Image sources (rows `{"id", "image", "captions", "meta"}`, captions optional):
  - a dataset directory (`manifest.jsonl`): its images, with their captions;
  - any other directory: every image (and video) under it, recursively; the id is the
    relative path without extension; a sidecar `<stem>.txt` adds captions, `<stem>.json`
    metadata;
  - a table (`.csv`, `.tsv`, `.jsonl`, `.parquet`) with an image path column; other columns
    become metadata (CSV cells that all read as numbers become numbers);
  - WebDataset shards (`.tar`, a brace pattern, or a directory of them): images (and videos)
    are stored under the index root by content hash.
A row whose file is a video becomes a video row when embedded (index_builder/video_index.py).
Text sources (rows `{"id", "text", "meta"}`, plus `image_id` for a dataset's captions):
  - a `.txt` file, one text per line; a table with a text column; a dataset's captions.

Duplicate ids within a source are refused; rows without an image file or a text are skipped
and counted (`Skips`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index_builder.atomic import atomic_open
from index_builder.data.common import IMAGE_EXTENSIONS, Skips
from index_builder.data.folder import find_images, other_files
from index_builder.data.video_folder import find_videos
from index_builder.data.wds import iter_samples, sample_captions, shard_paths
from index_builder.manifest import MANIFEST, image_path, load_records
from index_builder.video import VIDEO_EXTENSIONS

TABLES = (".csv", ".tsv", ".jsonl", ".parquet")
IMAGE_COLUMNS = ("image", "path", "filepath", "file", "url")
TEXT_COLUMNS = ("text", "caption", "sentence")


@dataclass(frozen=True)
class SourceOptions:
    """Column names for tables (None: the first of the usual names that is present)."""

    id_column: str = "id"
    image_column: str | None = None
    text_column: str | None = None
    split: str | None = None


def _is_dataset(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file() or path.name == MANIFEST


def _is_webdataset(source: str) -> bool:
    path = Path(source)
    return (
        source.endswith(".tar")
        or "{" in source
        or (path.is_dir() and any(path.glob("*.tar")) and not any(find_images(path)))
    )


def _require(source: str) -> Path:
    path = Path(source)
    if "{" not in source and not path.exists():
        raise FileNotFoundError(f"source not found: {source}")
    return path


def image_rows(
    source: str, options: SourceOptions, files_dir: Path, skips: Skips
) -> list[dict[str, Any]]:
    """Image rows from any image source (see the module docstring)."""
    path = _require(source)
    if _is_dataset(path):
        rows = dataset_rows(path, options.split)["image"]
    elif _is_webdataset(source):
        rows = _webdataset_rows(source, files_dir, skips)
    elif path.is_dir():
        rows = _folder_rows(path, skips)
    elif path.suffix.lower() in TABLES:
        rows = _table_image_rows(path, options, skips)
    else:
        raise ValueError(
            f"cannot read images from {source}: expected a directory, a dataset, WebDataset "
            f"shards or a table ({', '.join(TABLES)})"
        )
    return _unique(rows, source)


def text_rows(source: str, options: SourceOptions, skips: Skips) -> list[dict[str, Any]]:
    """Text rows from any text source (see the module docstring)."""
    path = _require(source)
    if _is_dataset(path):
        rows = dataset_rows(path, options.split)["text"]
    elif path.suffix.lower() == ".txt":
        rows = _lines_rows(path, skips)
    elif path.suffix.lower() in TABLES:
        rows = _table_text_rows(path, options, skips)
    else:
        raise ValueError(f"cannot read texts from {source}: expected a .txt file, a table "
                         f"({', '.join(TABLES)}) or a dataset directory")  # fmt: skip
    return _unique(rows, source)


def dataset_rows(dataset: str | Path, split: str | None) -> dict[str, list[dict[str, Any]]]:
    """A captioned dataset: one row per image and one per caption (`<image id>#<n>`)."""
    images, texts = [], []
    for record in load_records(dataset, split):
        meta = {**record.meta, "split": record.split}
        images.append(
            {
                "id": record.id,
                "image": str(image_path(dataset, record).resolve()),
                "captions": list(record.captions),
                "meta": meta,
            }
        )
        texts += [
            {"id": f"{record.id}#{j}", "image_id": record.id, "text": caption, "meta": meta}
            for j, caption in enumerate(record.captions)
        ]
    return {"image": images, "text": texts}


def _unique(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    seen: set[str] = set()
    duplicates = []
    for row in rows:
        if row["id"] in seen:
            duplicates.append(row["id"])
        seen.add(row["id"])
    if duplicates:
        raise ValueError(
            f"{len(duplicates)} duplicate ids in {source}, e.g. {duplicates[0]!r}: "
            "ids must be unique within a source"
        )
    return rows


def _folder_rows(root: Path, skips: Skips) -> list[dict[str, Any]]:
    """One row per image or video under `root`; any other file (not a sidecar) is skipped and
    named. `folder` is the file's folder relative to `root`, "" at the top."""
    for other in other_files(root, (*IMAGE_EXTENSIONS, *VIDEO_EXTENSIONS)):
        skips.add("not an image or video", other.relative_to(root).as_posix())
    rows = []
    for image in sorted([*find_images(root), *find_videos(root)]):
        relative = image.relative_to(root)
        folder = "" if relative.parent == Path(".") else relative.parent.as_posix()
        meta: dict[str, Any] = {"path": relative.as_posix(), "folder": folder}
        sidecar = image.with_suffix(".json")
        if sidecar.is_file():
            try:
                extra = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                extra = None
            if isinstance(extra, dict):
                meta.update(extra)
        rows.append(
            {
                "id": relative.with_suffix("").as_posix(),
                "image": str(image.resolve()),
                "captions": _sidecar_lines(image.with_suffix(".txt")),
                "meta": meta,
            }
        )
    return rows


def _sidecar_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [" ".join(line.split()) for line in lines if line.strip()]


def _lines_rows(path: Path, skips: Skips) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            text = " ".join(line.split())
            if not text:
                skips.add("empty line", f"{path.name}:{number}")
                continue
            rows.append({"id": f"{path.stem}:{number}", "text": text, "meta": {"line": number}})
    return rows


def read_table(path: Path) -> list[dict[str, Any]]:
    """A table's rows as dicts: CSV/TSV cells typed by column, JSONL and Parquet as stored."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        if any(not isinstance(row, dict) for row in rows):
            raise ValueError(f"{path}: every line must be a JSON object")
        return rows
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("reading Parquet needs pyarrow: pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    with path.open(encoding="utf-8", newline="") as handle:
        table = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    return _typed(table)


def _typed(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Empty cells dropped; a column whose cells all read as numbers becomes numbers."""
    columns = {name for row in table for name in row if name is not None}
    numeric = {name for name in columns if all(_number(row.get(name)) for row in table)}
    typed = []
    for row in table:
        out: dict[str, Any] = {}
        for name, value in row.items():
            if name is None or value is None or value == "":
                continue
            out[name] = _to_number(value) if name in numeric else value
        typed.append(out)
    return typed


def _number(value: Any) -> bool:
    if value is None or value == "":
        return True
    try:
        float(value)
    except ValueError:
        return False
    return value.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")


def _to_number(value: str) -> int | float:
    number = float(value)
    return int(number) if number.is_integer() and "." not in value and "e" not in value else number


def _column(row_keys: set[str], given: str | None, defaults: tuple[str, ...], path: Path) -> str:
    if given is not None:
        if given not in row_keys:
            raise ValueError(f"{path} has no column {given!r} (columns: {sorted(row_keys)})")
        return given
    for name in defaults:
        if name in row_keys:
            return name
    raise ValueError(
        f"{path} has none of the columns {list(defaults)}; name the column to read "
        f"(columns: {sorted(row_keys)})"
    )


def _table_image_rows(path: Path, options: SourceOptions, skips: Skips) -> list[dict[str, Any]]:
    table = read_table(path)
    if not table:
        raise ValueError(f"{path} has no rows")
    keys = {key for row in table for key in row}
    column = _column(keys, options.image_column, IMAGE_COLUMNS, path)
    captions = next((name for name in ("captions", *TEXT_COLUMNS) if name in keys), None)
    rows = []
    for number, row in enumerate(table, 1):
        value = row.get(column)
        if not value:
            skips.add(f"no {column}", f"{path.name} row {number}")
            continue
        image = Path(str(value)).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            skips.add("image file not found", str(value))
            continue
        item_id = str(row[options.id_column]) if row.get(options.id_column) else Path(value).stem
        rows.append(
            {
                "id": item_id,
                "image": str(image.resolve()),
                "captions": _caption_list(row.get(captions) if captions else None),
                "meta": {
                    k: v for k, v in row.items() if k not in (column, captions, options.id_column)
                },
            }
        )
    return rows


def _caption_list(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value] if value else []
    return [" ".join(str(item).split()) for item in items if str(item).strip()]


def _table_text_rows(path: Path, options: SourceOptions, skips: Skips) -> list[dict[str, Any]]:
    table = read_table(path)
    if not table:
        raise ValueError(f"{path} has no rows")
    keys = {key for row in table for key in row}
    column = _column(keys, options.text_column, TEXT_COLUMNS, path)
    rows = []
    for number, row in enumerate(table, 1):
        text = " ".join(str(row.get(column) or "").split())
        if not text:
            skips.add(f"empty {column}", f"{path.name} row {number}")
            continue
        item_id = (
            str(row[options.id_column]) if row.get(options.id_column) else f"{path.stem}:{number}"
        )
        meta = {k: v for k, v in row.items() if k not in (column, options.id_column)}
        rows.append({"id": item_id, "text": text, "meta": meta})
    return rows


def _webdataset_rows(source: str, files_dir: Path, skips: Skips) -> list[dict[str, Any]]:
    """WebDataset samples with an image member; the image bytes are stored by content hash."""
    path = Path(source)
    shards = sorted(path.glob("*.tar")) if path.is_dir() else shard_paths(source)
    files_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for shard in shards:
        for key, parts in iter_samples(shard, skips):
            media = (*IMAGE_EXTENSIONS, *VIDEO_EXTENSIONS)
            extension = next((e for e in parts if f".{e}" in media), None)
            if extension is None:
                skips.add("sample without an image or video", f"{shard.name}:{key}")
                continue
            captions, meta = sample_captions(parts)
            rows.append(
                {
                    "id": key,
                    "image": str(store_file(files_dir, parts[extension], extension)[0]),
                    "captions": captions,
                    "meta": {k: v for k, v in meta.items() if k not in ("caption", "captions")},
                }
            )
    return rows


def stored_name(data: bytes, extension: str) -> str:
    """The name `store_file` keeps `data` under: its content hash and extension."""
    return f"{hashlib.sha256(data).hexdigest()}.{extension.lower()}"


def store_file(files_dir: Path, data: bytes, extension: str) -> tuple[Path, bool]:
    """Keep `data` under `files_dir` by content hash (idempotent); returns its path and
    whether this call created it. A file already there is touched: its time says when it was
    last wanted, and `store.collect_files` spares young files no version names yet."""
    files_dir.mkdir(parents=True, exist_ok=True)
    path = (files_dir / stored_name(data, extension)).resolve()
    if path.is_file():
        with contextlib.suppress(OSError):
            os.utime(path)
        return path, False
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return path, True
