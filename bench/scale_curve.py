"""The cost of serving against gallery size (issue 27): one realistic gallery, FAISS with the
automatic index choice, at several sizes per side.

    python -m bench.scale_curve --bundle cots-data/bundles/demo \
        --real cots-data/real-embeddings/openclipart cots-data/real-embeddings/emoji \
        cots-data/real-embeddings/synthetic --sizes 100000,1000000,3000000,10000000 \
        --work cots-data/scale

For each size N (a prefix of one generated gallery, bench/realistic_gallery.py, so every size
holds the same items): publish N images and N captions with `cots index build`'s defaults and
record the build time of each side, the version's disk use and the time to load it (open and
one search per side, in a fresh process: what a service does when CURRENT moves); serve it
with bench/service_load.py (served recall@10 with held-out real queries, p50 at concurrency 1,
req/s and p99 at 16, the service's resident memory, the in-process floor); then time a 1%
change (N/100 new images with one caption each appended as a new version). Results go to
bench/results/scale_curve.json (one service_load result per size in bench/results/scale/),
with the machine's calibration (bench/calibration.py) printed and recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast, overload

import numpy as np

from bench import calibration
from bench.figure import Figure, Plot, command_line, note, pyplot, save
from bench.gallery_files import generated
from bench.realistic_gallery import RESULTS, ROOT, add_model_args, fitted, shown
from bench.tables import table as generic_table

DIM_BYTES = 4  # float32


class Rows(Sequence[dict[str, Any]]):
    """The synthetic rows of a generated gallery, made on demand (10M rows as dicts would not
    fit in memory): image `syn<i>` with one caption `syn<i>#0`, as bench/service_load.py
    names them."""

    def __init__(self, side: str, count: int, start: int = 0, prefix: str = "syn") -> None:
        self.side, self.size, self.start, self.prefix = side, count, start, prefix

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, i: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.size))]
        if not -self.size <= i < self.size:
            raise IndexError(i)
        return self.row(self.start + i % self.size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self.row(self.start + i) for i in range(self.size))

    def row(self, i: int) -> dict[str, Any]:
        item, text = f"{self.prefix}{i:07d}", f"synthetic caption {i}"
        if self.side == "image":
            return {"id": item, "image": f"synthetic/{item}.png", "captions": [text], "meta": {}}
        return {"id": f"{item}#0", "image_id": item, "text": text}


def build(root: Path, args: argparse.Namespace, images: np.ndarray, captions: np.ndarray) -> str:
    """Publish the gallery with the default (automatic) index choice; named as
    bench/service_load.py names a realistic gallery, so that it reuses this version."""
    from index_builder.backends.base import SIDES, IndexOptions
    from index_builder.backends.faiss.store import IndexStore
    from index_builder.bundle import Bundle

    bundle, n = Bundle.load(args.bundle), len(images)
    return IndexStore(root).publish(
        bundle_id=bundle.bundle_id,
        bundle_path=bundle.path,
        dim=bundle.embed_dim,
        shards={"image": [images], "text": [captions]},
        rows=cast(dict[str, list[dict[str, Any]]], {side: Rows(side, n) for side in SIDES}),
        options=IndexOptions(),
        dataset={"name": f"realistic-{n}-automatic", "path": "synthetic", "fingerprint": f"{n}"},
    )


LOAD = """
import sys, time
t = time.perf_counter()
from index_builder.backends.faiss.store import IndexStore
index = IndexStore(sys.argv[1]).open()
for side in index.sides:
    index.search(side, index.vector(side, 0)[None], 10)
opened = time.perf_counter() - t
for side in index.sides:
    index.warm(side)
print(round(opened, 2), round(time.perf_counter() - t, 2))
"""


def load_seconds(root: Path) -> tuple[float, float]:
    """Seconds a fresh process takes to open the current version and search each side, and
    to have also warmed it (id lookups and filter columns) as a service does before it
    switches to a new version."""
    out = subprocess.run(
        [sys.executable, "-c", LOAD, str(root)], check=True, capture_output=True, text=True
    )
    opened, warmed = out.stdout.split()[-2:]
    return float(opened), float(warmed)


def change_seconds(root: Path, added: tuple[np.ndarray, np.ndarray]) -> float:
    """Seconds to publish a change that appends the given images and captions."""
    from index_builder.backends.faiss.store import IndexStore
    from index_builder.collection import Change, change

    store = IndexStore(root)
    n, current = len(added[0]), store.open()
    rows = {side: Rows(side, n, prefix="new") for side in ("image", "text")}
    request = Change(
        rows={side: list(r) for side, r in rows.items()},
        vectors={"image": added[0], "text": added[1]},
    )
    started = time.perf_counter()
    change(store, current, request)
    return round(time.perf_counter() - started, 1)


def serve(work: Path, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """bench/service_load.py against the published version (reused from `work`)."""
    out = RESULTS / "scale" / f"service_load-{size}.json"
    argv = [
        *("--bundle", str(args.bundle), "--realistic-gallery", str(size)),
        *("--real", *(str(p) for p in args.real), "--work", str(work)),
        *("--requests", str(args.requests), "--max-seconds", "30", "--concurrency", "1,16"),
        *("--ready-seconds", "900", "--out", shown(out)),
    ]
    print("$", command_line("service_load", argv), flush=True)
    subprocess.run([sys.executable, "-m", "bench.service_load", *argv], check=True, cwd=ROOT)
    return json.loads(out.read_text())


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def endpoint(served: dict[str, Any], name: str, concurrency: int) -> dict[str, Any]:
    return next(r for r in served["endpoints"][name] if r["concurrency"] == concurrency)


def figures(size: int, info: dict[str, Any], served: dict[str, Any]) -> dict[str, Any]:
    """One row of the curve from the version's record and the service's load result."""
    raw = 2 * size * info["embed_dim"] * DIM_BYTES
    row: dict[str, Any] = {"size": size, "raw_vectors_bytes": raw}
    for side in ("image", "text"):
        row[f"{side}_factory"] = info["sides"][side]["factory"]
        row[f"{side}_build_seconds"] = info["sides"][side]["build_seconds"]
    for way, name in (("t2i", "text-to-image"), ("i2t", "image-to-text")):
        one, many = endpoint(served, f"/search/{name}", 1), endpoint(served, f"/search/{name}", 16)
        floor = served["floor_in_process"][name]["p50_ms"]
        row.update(
            {
                f"{way}_recall_at_10": one["recall_at_10"],
                f"{way}_p50_ms": one["p50_ms"],
                f"{way}_floor_p50_ms": floor,
                f"{way}_http_over_floor": round(one["p50_ms"] / floor, 2),
                f"{way}_rps_16": many["throughput_rps"],
                f"{way}_p99_ms_16": many["p99_ms"],
            }
        )
    memory = served["server_memory_bytes"]
    row["service_rss_bytes"], row["service_hwm_bytes"] = memory["VmRSS"], memory["VmHWM"]
    row["service_rss_over_raw"] = round(memory["VmRSS"] / raw, 3)
    row["service_anon_over_raw"] = round(memory["RssAnon"] / raw, 3)  # less mapped file pages
    return row


def measure(size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Build, load, serve and change one size; its work directory is removed afterwards."""
    from index_builder.backends.faiss.store import IndexStore

    gallery = argparse.Namespace(**{**vars(args), "size": size})
    images, captions, _ = generated(gallery)
    work = args.work / str(size)
    root, wall = work / "index", None
    kept = IndexStore(root).read_info() if args.reuse and IndexStore(root).current() else None
    if kept and kept["dataset"]["name"] == f"realistic-{size}-automatic":
        version = kept["version"]  # built by an interrupted run: its build times are recorded
    else:
        shutil.rmtree(work, ignore_errors=True)
        started = time.perf_counter()
        version = build(root, args, images, captions)
        wall = round(time.perf_counter() - started, 1)
    info = IndexStore(root).read_info()
    disk = disk_bytes(root / "versions" / version)
    loaded = load_seconds(root)
    row = figures(size, info, serve(work, size, args))
    row.update(build_wall_seconds=wall, disk_bytes=disk)
    row["load_seconds"], row["load_and_warm_seconds"] = loaded
    row["disk_over_raw"] = round(disk / row["raw_vectors_bytes"], 3)
    if size <= args.change_max:
        _, _, model = fitted(gallery)
        row["change_1pct_seconds"] = change_seconds(root, model.sample(size // 100, seed=size))
    shutil.rmtree(work, ignore_errors=True)
    return row


GOALS = (  # (figure, at most, target): ratios of the largest size to 1M, or absolute
    ("t2i_p50_ms", True, 1.5),
    ("t2i_rps_16", False, 0.7),
)


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals on the curve measured so far."""
    out = []
    for row in rows:
        for way in ("t2i", "i2t"):
            out.append(
                check(
                    f"{row['size']}: {way} recall@10 >= 0.95",
                    row[f"{way}_recall_at_10"],
                    0.95,
                    False,
                )
            )
            out.append(
                check(
                    f"{row['size']}: {way} HTTP p50 / floor <= 1.3",
                    row[f"{way}_http_over_floor"],
                    1.3,
                    True,
                )
            )
    big, base = rows[-1], next((r for r in rows if r["size"] == 1_000_000), None)  # by size
    out.append(
        check(
            f"{big['size']}: service RSS / raw vectors <= 0.35",
            big["service_rss_over_raw"],
            0.35,
            True,
        )
    )
    out.append(check(f"{big['size']}: disk / raw vectors <= 1.6", big["disk_over_raw"], 1.6, True))
    served_in = big.get("load_and_warm_seconds", big["load_seconds"])  # what a service waits
    out.append(check(f"{big['size']}: new version serves (s) <= 60", served_in, 60, True))
    if base is not None and big is not base:
        for figure, at_most, target in GOALS:
            sign = "<=" if at_most else ">="
            ratio = round(big[figure] / base[figure], 2)
            out.append(
                check(f"{big['size']} / 1M {figure} {sign} {target}", ratio, target, at_most)
            )
        for side in ("image", "text"):
            key = f"{side}_build_seconds"
            ratio = round(big[key] / base[key], 2)
            out.append(
                check(
                    f"{big['size']} / 1M {key} <= {big['size'] / 1e6:g}",
                    ratio,
                    big["size"] / 1e6,
                    True,
                )
            )
    return out


def check(goal: str, measured: float, target: float, at_most: bool) -> dict[str, Any]:
    met = measured <= target if at_most else measured >= target
    return {"goal": goal, "measured": measured, "met": bool(met)}


COLUMNS = (
    ("size", "items per side"),
    ("image_factory", "index"),
    ("t2i_recall_at_10", "t2i recall@10"),
    ("i2t_recall_at_10", "i2t recall@10"),
    ("t2i_p50_ms", "t2i p50 ms (c=1)"),
    ("i2t_p50_ms", "i2t p50 ms (c=1)"),
    ("t2i_rps_16", "t2i req/s (c=16)"),
    ("t2i_p99_ms_16", "t2i p99 ms (c=16)"),
    ("i2t_rps_16", "i2t req/s (c=16)"),
    ("t2i_http_over_floor", "t2i HTTP/floor"),
    ("image_build_seconds", "build s (image)"),
    ("text_build_seconds", "build s (text)"),
    ("service_rss_over_raw", "service RSS / raw"),
    ("service_anon_over_raw", "service anon / raw"),
    ("disk_over_raw", "disk / raw"),
    ("load_seconds", "load s"),
    ("load_and_warm_seconds", "load+warm s"),
    ("change_1pct_seconds", "1% change s"),
)


def table(rows: list[dict[str, Any]]) -> str:
    """The curve as a markdown table (docs/benchmarks.md)."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "-")) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def plot_curve(data: Any, out: Path) -> Path | None:
    """Cost against size, log-scaled sizes: latency, throughput, seconds, bytes per raw."""
    rows = data.get("rows") if isinstance(data, dict) else None
    if not rows:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(18, 4.2))
    for ax, (title, keys) in zip(axes, PANELS, strict=True):
        for key in keys:
            points = [(row["size"], row[key]) for row in rows if row.get(key)]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=key)
        ax.set_xscale("log")
        ax.set_xlabel("items per side")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    return save(fig, out)


PANELS = (
    ("latency at concurrency 1 (ms)", ("t2i_p50_ms", "i2t_p50_ms", "t2i_floor_p50_ms")),
    ("req/s at concurrency 16", ("t2i_rps_16", "i2t_rps_16")),
    (
        "seconds",
        ("image_build_seconds", "text_build_seconds", "load_seconds", "load_and_warm_seconds")
        + ("change_1pct_seconds",),
    ),
    ("bytes / raw vectors", ("service_rss_over_raw", "service_anon_over_raw", "disk_over_raw")),
)


def render(data: Any) -> str:
    """The calibration, the curve and its goals, as markdown."""
    rates = ", ".join(f"{k} {v}" for k, v in data.get("calibration", {}).items())
    goals = generic_table(data.get("goals", []), ["goal", "measured", "met"])
    head = f"Machine calibration at the start: {rates}."
    return "\n\n".join([head, table(data.get("rows", [])), goals])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--sizes", default="100000,1000000,3000000,10000000")
    parser.add_argument("--work", type=Path, required=True, help="scratch (removed per size)")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument(
        "--change-max", type=int, default=3_000_000, help="largest size to time a 1%% change at"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "scale_curve.json")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="go on with an interrupted run: keep the sizes already in --out and the versions "
        "already published under --work",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # build progress
    machine = calibration.rates()
    print("calibration:", json.dumps(machine), flush=True)
    result: dict[str, Any] = {
        "calibration": machine,
        "command": command_line("scale_curve", sys.argv[1:] if argv is None else argv),
        "rows": [],
    }
    if args.reuse and args.out.is_file():
        result = {**json.loads(args.out.read_text()), "continued": result}
    done = {row["size"] for row in result["rows"]}
    for size in (int(s) for s in args.sizes.split(",") if int(s) not in done):  # as given
        result["rows"].append(measure(size, args))
        result["rows"].sort(key=lambda row: row["size"])
        result["goals"] = goals(result["rows"])
        result["table"] = table(result["rows"]).splitlines()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(table(result["rows"]), flush=True)
    print(json.dumps(result["goals"], indent=2))
    return 0


FIGURE = Figure(
    "Ten million items per side: cost against size",
    "scale_curve*.json",
    "python -m bench.scale_curve --bundle cots-data/bundles/demo --real "
    "cots-data/real-embeddings/openclipart cots-data/real-embeddings/emoji "
    "cots-data/real-embeddings/synthetic --work cots-data/scale",
    (Plot("cost", plot_curve, "cost against items per side (FAISS, automatic index choice)"),),
    note=note("scale_curve"),
    render=render,
)


if __name__ == "__main__":
    sys.exit(main())
