"""Memory and time of a loaded version's rows: parsed into dicts (before issue 13) against
memory-mapped and parsed on access (index_builder.backends.faiss.rows), at a million rows a side.

    python -m bench.rows_memory --rows 1000000

Writes an index version of N synthetic rows per side shaped like bench/service_load.py's
synthetic gallery (images {"id","image","captions":[..],"meta"}, texts {"id","image_id",
"text"}), once with empty image metas and once with small ones ({"year", "label"}); the
FAISS indexes are 1-dimensional Flat ones, so the rows dominate. Each way loads it in a fresh
subprocess and reports resident memory deltas (anonymous memory, and file pages of the mapped
rows, which the kernel may reclaim and processes share) and times: loading with the id
lookups built (as the service does before it is ready), the same after glibc's malloc_trim
(memory still held, less free heap the allocator kept from the load's temporaries), 1000
`row_of` lookups, `caption_rows` of 100 images, then a first filtered search per field (each
builds its filter column: one pass parsing every row in the new way).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.figure import command_line
from index_builder.atomic import read_jsonl, write_jsonl
from index_builder.backends.faiss.store import IndexStore
from index_builder.backends.faiss.version import INDEX_JSON
from index_builder.filters import Columns, parse

RESULTS = Path(__file__).parent / "results"
VERSION = "v000001-20250101T000000Z"
FIELDS = {"label": "string", "year": "number"}
FILTERS = {"label": {"label": "l7"}, "year": {"year": {"gte": 2000}}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per side")
    parser.add_argument("--out", type=Path, default=RESULTS / "rows_memory.json", help="results")
    parser.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_version(root: Path, n: int, metas: str) -> None:
    """An index root whose current version holds n synthetic rows per side."""
    path = root / "versions" / VERSION
    path.mkdir(parents=True)
    sides = {}
    for side, meta_file in (("image", "images.jsonl"), ("text", "texts.jsonl")):
        rows = [synthetic_row(side, i, metas) for i in range(n)]
        write_jsonl(path / meta_file, rows)
        del rows
        index = faiss.IndexFlatIP(1)
        index.add(np.zeros((n, 1), np.float32))
        faiss.write_index(index, str(path / f"{side}.faiss"))
        fields = FIELDS if side == "image" and metas == "small" else {}
        sides[side] = {"file": f"{side}.faiss", "meta": meta_file, "search_params": {},
                       "count": n, "fields": fields}  # fmt: skip
    info = {"version": VERSION, "embed_dim": 1, "bundle_id": "bench", "sides": sides}
    (path / INDEX_JSON).write_text(json.dumps(info))
    (root / "CURRENT").write_text(VERSION + "\n")


def synthetic_row(side: str, i: int, metas: str) -> dict[str, Any]:
    item, text = f"syn{i:07d}", f"synthetic caption {i}"
    if side == "text":
        return {"id": f"{item}#0", "image_id": item, "text": text}
    meta = {"year": 1950 + i % 70, "label": f"l{i % 100}"} if metas == "small" else {}
    return {"id": item, "image": f"synthetic/{item}.png", "captions": [text], "meta": meta}


def memory() -> dict[str, float]:
    """This process's resident memory in MB: all, anonymous, file-backed, and the peak."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    kb = {key: int(fields[key].split()[0]) for key in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
    return {"rss": kb["VmRSS"] / 1024, "anon": kb["RssAnon"] / 1024,
            "file": kb["RssFile"] / 1024, "peak": kb["VmHWM"] / 1024}  # fmt: skip


class OldRows:
    """The loaded rows before issue 13: dicts in lists, an id dict, full passes."""

    def __init__(self, path: Path) -> None:
        self.indexes = [faiss.read_index(str(path / f"{side}.faiss")) for side in ("image", "text")]
        self.rows = {side: read_jsonl(path / f"{side}s.jsonl") for side in ("image", "text")}
        self.ids = {
            side: {str(row["id"]): i for i, row in enumerate(rows)}
            for side, rows in self.rows.items()
        }
        self.columns: Columns | None = None

    def row_of(self, side: str, item_id: str) -> int | None:
        return self.ids[side].get(item_id)

    def caption_rows(self, image_ids: set[str]) -> list[int]:
        rows = self.rows["text"]
        return [i for i, row in enumerate(rows) if row.get("image_id") in image_ids]

    def filter_mask(self, filter: dict[str, Any]) -> np.ndarray:
        if self.columns is None:
            self.columns = Columns([row.get("meta") or {} for row in self.rows["image"]])
        return self.columns.mask(parse(filter, FIELDS))


class NewRows:
    """The loaded rows now: `IndexStore.open`, ids looked up as the service does at load."""

    def __init__(self, root: Path) -> None:
        self.index = IndexStore(root).open()
        for side in self.index.sides:
            self.index.row_of(side, "")

    def row_of(self, side: str, item_id: str) -> int | None:
        return self.index.row_of(side, item_id)

    def caption_rows(self, image_ids: set[str]) -> list[int]:
        return self.index.caption_rows(image_ids)

    def filter_mask(self, filter: dict[str, Any]) -> np.ndarray:
        mask = self.index.filter_mask("image", filter)
        assert mask is not None
        return mask


def child(way: str, root: Path) -> dict[str, Any]:
    """Load the version one way and measure it (run in a fresh process)."""
    info = json.loads((root / "versions" / VERSION / INDEX_JSON).read_text())
    n = info["sides"]["image"]["count"]
    base = memory()
    started = time.perf_counter()
    loaded = OldRows(root / "versions" / VERSION) if way == "old" else NewRows(root)
    result: dict[str, Any] = {"load_s": round(time.perf_counter() - started, 2)}
    result["loaded"] = delta(base, memory())
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what stays held, less the allocator's free pages
    result["loaded_trimmed"] = delta(base, memory())
    ids = [f"syn{i:07d}" for i in np.random.default_rng(0).integers(0, n, 1000)]
    started = time.perf_counter()
    assert all(loaded.row_of("image", i) == int(i[3:]) for i in ids)
    result["row_of_us"] = round((time.perf_counter() - started) / len(ids) * 1e6, 1)
    started = time.perf_counter()
    assert len(loaded.caption_rows(set(ids[:100]))) == len(set(ids[:100]))
    result["caption_rows_100_s"] = round(time.perf_counter() - started, 3)
    if info["sides"]["image"]["fields"]:
        for name, filter in FILTERS.items():
            started = time.perf_counter()
            loaded.filter_mask(filter)
            result[f"first_filter_{name}_s"] = round(time.perf_counter() - started, 2)
        result["filtered"] = delta(base, memory())
    return result


def delta(base: dict[str, float], now: dict[str, float]) -> dict[str, float]:
    return {key: round(now[key] - base[key if key != "peak" else "rss"], 1) for key in now}


def run_child(way: str, root: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.rows_memory", "--child", way, "--root", str(root)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.root)))
        return
    result: dict[str, Any] = {
        "command": command_line("rows_memory", sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "rows_per_side": args.rows,
        "units": "MB (resident deltas from before loading; peak: high-water mark), seconds",
    }
    for metas in ("empty", "small"):
        with tempfile.TemporaryDirectory(prefix="rows-memory-") as tmp:
            root = Path(tmp)
            write_version(root, args.rows, metas)
            files = root / "versions" / VERSION
            sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in files.glob("*.jsonl")}
            result[f"{metas}_metas"] = {"jsonl_mb": sizes}
            for way in ("old", "new"):
                result[f"{metas}_metas"][way] = run_child(way, root)
                print(metas, way, json.dumps(result[f"{metas}_metas"][way]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
