"""Saved filter columns of a 1M-row segment: the keys as JSON and a dict of arrays (before)
against the keys as sorted arrays (`index_builder.postings`), in one run.

    nice -n 5 python -m bench.filter_columns --rows 1000000

The segment's metadata: `path`, distinct per row ("t3/s17/0000042.jpg": 20 top folders of 50
subfolders each), `category` (50 values) and `n` (a number). Each way builds the columns from
the rows and saves them (`Columns.save`), then a fresh subprocess loads the file
(`Columns.load`, as a version load does) and reports its resident memory growth, the time
to load it with a delta of 1% more rows (two files merged), and the
time of filters: an `eq` on the path, an `in` of 100 paths, an `eq` on the category, a range
on `n`, and `under` a top folder and a subfolder of the path (the op a filter on the folder
field becomes; on the path field, one key per row, the worst case for it). "old" is
index_builder/filters.py at OLD_COMMIT (read with `git show` and imported in its own
subprocesses), "new" the working tree's; each way saves and loads in fresh subprocesses.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.calibration import rates
from bench.figure import command_line
from bench.rows_memory import memory
from index_builder.atomic import atomic_write_json

RESULTS = Path(__file__).parent / "results"
OLD_COMMIT = "224b54b"  # main before the array form
FIELDS = {"category": "string", "n": "number", "path": "string"}
REPEATS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the segment")
    parser.add_argument("--out", type=Path, default=RESULTS / "filter_columns.json")
    parser.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=("save", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def path_of(i: int) -> str:
    return f"t{i % 20}/s{i % 1000}/{i:07d}.jpg"


def metas(n: int) -> list[dict[str, Any]]:
    return [
        {"path": path_of(i), "category": f"c{i % 50}", "n": (i * 7919) % 10_000} for i in range(n)
    ]


def clauses(n: int) -> dict[str, list[tuple[str, str, Any]]]:
    """The filters timed, as parsed clauses (`under` on the path written directly)."""
    step = max(1, n // 100)
    return {
        "eq_path": [("path", "eq", path_of(n // 2))],
        "in_100_paths": [("path", "in", [path_of(i) for i in range(0, n, step)][:100])],
        "eq_category": [("category", "eq", "c7")],
        "range_n": [("n", "gte", 2500.0), ("n", "lt", 5000.0)],
        "under_top": [("path", "under", ["t3"])],
        "under_subfolder": [("path", "under", ["t3/s23"])],
    }


def module(way: str) -> Any:
    """The filters module of `way`: the working tree's, or (old) `old_filters`, the file the
    parent wrote from OLD_COMMIT and put on the child's PYTHONPATH."""
    return importlib.import_module("index_builder.filters" if way == "new" else "old_filters")


class Unread:
    """`n` rows that are never read: loaded columns need only their number."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def child(way: str, filters: Any, file: Path, n: int) -> dict[str, Any]:
    """Load the saved columns (fresh process), then time each filter."""
    gc.collect()
    base = memory()
    started = time.perf_counter()
    columns = filters.Columns(Unread(n))
    columns.load([(file, n)])
    load_s = time.perf_counter() - started
    gc.collect()
    after = memory()
    result: dict[str, Any] = {
        "load_s": round(load_s, 3),
        "rss_growth_mb": round(after["rss"] - base["rss"], 1),
        "peak_growth_mb": round(after["peak"] - base["rss"], 1),
        "load_with_delta_s": load_with_delta(filters, file, n),
    }
    for name, parsed in clauses(n).items():
        times, count = [], 0
        for _ in range(REPEATS):
            started = time.perf_counter()
            count = int(columns.mask(parsed).sum())
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        result[name] = {"first_ms": round(times[0] * 1e3, 3),
                        "median_ms": round(median * 1e3, 3), "rows": count}  # fmt: skip
    return result


def load_with_delta(filters: Any, file: Path, n: int) -> float:
    """Seconds to load the segment and its delta (saved beside it), merged as a version of
    both loads them."""
    delta = file.with_name(file.name.replace(".columns", ".d1.columns"))
    started = time.perf_counter()
    filters.Columns(Unread(n + n // 100)).load([(file, n), (delta, n // 100)])
    return round(time.perf_counter() - started, 3)


def save(way: str, filters: Any, rows: list[dict[str, Any]], file: Path) -> dict[str, Any]:
    columns = filters.Columns(rows)
    started = time.perf_counter()
    columns.build(FIELDS)
    built = time.perf_counter()
    columns.save(file, FIELDS)  # the columns are built: this is the write
    return {"build_s": round(built - started, 3), "write_s": round(time.perf_counter() - built, 3),
            "file_bytes": file.stat().st_size}  # fmt: skip


def saved(way: str, file: Path, n: int) -> dict[str, Any]:
    """(In a child) build and save the columns of the segment's `n` rows to `file`, and of
    1% more rows to its delta beside it; the build and write figures."""
    filters, rows = module(way), metas(n + n // 100)
    out = save(way, filters, rows[:n], file)
    filters.Columns(rows[n:]).save(file.with_name(f"{way}.d1.columns.npz"), FIELDS)
    return out


def in_child(way: str, stage: str, file: Path, n: int, tmp: Path) -> dict[str, Any]:
    """One stage of `way` in a fresh subprocess (the old module importable from `tmp`)."""
    command = [sys.executable, "-m", "bench.filter_columns", "--child", way, "--stage", stage,
               "--rows", str(n), "--file", str(file)]  # fmt: skip
    path = os.pathsep.join(p for p in (str(tmp), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(command, check=True, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path})  # fmt: skip
    return json.loads(done.stdout)


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:index_builder/filters.py"],
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    (tmp / "old_filters.py").write_text(source)
    ways: dict[str, Any] = {}
    for way in ("old", "new"):
        file = tmp / f"{way}.columns.npz"
        ways[way] = in_child(way, "save", file, args.rows, tmp)
        ways[way].update(in_child(way, "load", file, args.rows, tmp))
        print(way, json.dumps(ways[way]), flush=True)
    for name in clauses(args.rows):
        assert ways["old"][name]["rows"] == ways["new"][name]["rows"], name
    keys = ("build_s", "write_s", "file_bytes", "load_s", "load_with_delta_s", "rss_growth_mb")
    ratios = {key: round(ways["old"][key] / max(ways["new"][key], 1e-9), 1) for key in keys}
    for name in clauses(args.rows):
        ratios[f"{name}_median"] = round(
            ways["old"][name]["median_ms"] / max(ways["new"][name]["median_ms"], 1e-6), 1
        )
    return {**ways, "old_over_new": ratios}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child and args.stage == "save":
        print(json.dumps(saved(args.child, args.file, args.rows)))
        return
    if args.child:
        print(json.dumps(child(args.child, module(args.child), args.file, args.rows)))
        return
    result: dict[str, Any] = {
        "command": "nice -n 5 " + command_line("filter_columns", sys.argv[1:]),
        "rows": args.rows,
        "old_code": f"index_builder/filters.py at {OLD_COMMIT}, new_code: the working tree",
        "units": "seconds, MB (resident growth of the loaded columns), ms a filter",
        "calibration_before": rates(),
    }
    with tempfile.TemporaryDirectory(prefix="filter-columns-") as tmp:
        result.update(run(args, Path(tmp)))
    result["calibration_after"] = rates()
    print(json.dumps(result["old_over_new"]), json.dumps(result["calibration_after"]))
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
