"""CSV / TSV of image path and caption; rows that share an image become one multi-caption record."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from index_builder.data.common import (
    ImportResult,
    Skips,
    fingerprint,
    image_problem,
    progress,
    run_import,
)
from index_builder.manifest import SPLITS, Record, split_of

VERSION = 1
DELIMITERS = {"csv": ",", "tsv": "\t"}


@dataclass(frozen=True)
class TableConfig:
    path: str
    image_column: str = "image"
    caption_column: str = "caption"
    split_column: str = "split"  # used when the table has it; otherwise a hash of the image
    format: str = "auto"  # csv, tsv, or auto: from the file extension
    images: str = ""  # directory relative image paths start from (default: the table's)


def table_format(cfg: TableConfig) -> str:
    if cfg.format != "auto":
        if cfg.format not in DELIMITERS:
            raise ValueError(f"--format must be auto, csv or tsv, got {cfg.format!r}")
        return cfg.format
    suffix = Path(cfg.path).suffix.lower().lstrip(".")
    if suffix not in DELIMITERS:
        raise ValueError(
            f"cannot tell the format of {cfg.path} from its extension; pass --format csv or tsv"
        )
    return suffix


def read_table(cfg: TableConfig, skips: Skips) -> dict[str, tuple[list[str], str]]:
    """image path -> (captions, split from the table or ""), in first-seen order."""
    path = Path(cfg.path)
    delimiter = DELIMITERS[table_format(cfg)]
    merged: dict[str, tuple[list[str], str]] = {}
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        columns = reader.fieldnames or []
        for column in (cfg.image_column, cfg.caption_column):
            if column not in columns:
                raise ValueError(
                    f"{path} has no column {column!r} (columns: {', '.join(columns) or 'none'})"
                )
        for row in progress(reader, f"reading {path.name}"):
            where = f"line {reader.line_num}"
            if None in row or None in row.values():
                skips.add("wrong number of fields", where)
                continue
            image, caption = (
                row[cfg.image_column].strip(),
                " ".join(row[cfg.caption_column].split()),
            )
            if not image or not caption:
                skips.add("empty image path or caption", where)
                continue
            captions, split = merged.setdefault(
                image, ([], (row.get(cfg.split_column) or "").strip())
            )
            if caption not in captions:
                captions.append(caption)
    return merged


def import_table(cfg: TableConfig, out: str | Path) -> ImportResult:
    path = Path(cfg.path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    table_format(cfg)
    base = Path(cfg.images).resolve() if cfg.images else path.resolve().parent
    options = {**cfg.__dict__, "path": str(path.resolve()), "base": str(base), "v": VERSION}
    fp = fingerprint("csv", options, [path])
    info = {"name": Path(out).name, "source": "csv", "table": str(path.resolve())}

    def produce(skips: Skips) -> Iterator[Record]:
        try:
            table = read_table(cfg, skips)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ValueError(f"{path} is not a readable {table_format(cfg)} file: {exc}") from None
        for name, (captions, split) in progress(table.items(), "csv", len(table)):
            image = (base / name).resolve()
            problem = image_problem(image) or (
                f"unknown split {split!r}" if split and split not in SPLITS else None
            )
            if problem:
                skips.add(problem, name)
                continue
            rid = "csv." + hashlib.sha1(name.encode()).hexdigest()[:16]
            yield Record(rid, str(image), tuple(captions), split or split_of(name), {"file": name})

    return run_import(out, info, fp, produce)
