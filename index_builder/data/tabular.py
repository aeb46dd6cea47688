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
    Splits,
    fingerprint,
    progress,
    read_image,
    run_import,
)
from index_builder.manifest import SPLITS, Record

VERSION = 2  # 2: full decode, split by content, merges counted
DELIMITERS = {"csv": ",", "tsv": "\t"}


@dataclass(frozen=True)
class TableConfig:
    path: str
    image_column: str = "image"
    caption_column: str = "caption"
    split_column: str = "split"  # used when the table has it; otherwise the shared split rule
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
    """image path -> (captions, split from the table or ""), in first-seen order.

    A later row of the same image adds its caption (counted as merged); a repeated row is
    dropped (counted); a row that gives the image another split is skipped.
    """
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
            split = (row.get(cfg.split_column) or "").strip()
            earlier = merged.get(image)
            if earlier is None:
                merged[image] = ([caption], split)
            elif earlier[1] != split:
                skips.add("split differs from an earlier row of the image", where)
            elif caption in earlier[0]:
                skips.merge("repeated row")
            else:
                earlier[0].append(caption)
                skips.merge("caption row of an earlier image")
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

    def produce(skips: Skips, splits: Splits) -> Iterator[Record]:
        try:
            table = read_table(cfg, skips)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ValueError(f"{path} is not a readable {table_format(cfg)} file: {exc}") from None
        for name, (captions, split) in progress(table.items(), "csv", len(table)):
            if split and split not in SPLITS:
                skips.add(f"unknown split {split!r}", name)
                continue
            image = (base / name).resolve()
            digest, problem = read_image(image)
            if problem:
                skips.add(problem, name)
                continue
            rid = "csv." + hashlib.sha1(name.encode()).hexdigest()[:16]
            split = split or splits.assign(rid, digest)
            yield Record(rid, str(image), tuple(captions), split, {"file": name})

    return run_import(out, info, fp, produce)
