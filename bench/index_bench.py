"""Index build time, memory, latency, QPS and cross-modal recall@10 per FAISS index type.

Synthetic unit vectors stand in for a gallery: clustered "image" embeddings, and "caption"
queries that are noisy copies of images (another modality near, not on, the gallery).
Exact search cannot beat the memory-bandwidth floor N*D*4 bytes / bandwidth per query.

    python -m bench.index_bench --sizes 10000 100000 1000000 --threads 2
    python -m bench.index_bench --sizes 1000000 --factories Flat 'IVF{nlist},Flat' \
        --merge                     # add a 1M row set to bench/results/index_bench.json

In --factories, `{nlist}` becomes the IVF list count index_builder chooses for each size
(about 4 sqrt(N), a power of two: 256 at 10k, 1024 at 100k, 4096 at 1M).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.figure import Figure, Plot, pyplot, save
from bench.tables import records
from index_builder.backends.base import ivf_lists
from index_builder.backends.faiss import faiss_index as fi
from index_builder.backends.faiss import search as faiss_search
from index_builder.backends.recall import METRIC, exact_knn

RESULTS = Path(__file__).parent / "results"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(n: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(16, n // 200), dim)).astype(np.float32)
    base = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # chunks keep the temporaries small
        stop = min(n, start + 100_000)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        base[start:stop] = unit(centres[rng.integers(0, len(centres), stop - start)] + 0.6 * noise)
    picks = rng.integers(0, n, queries)
    noise = rng.standard_normal((queries, dim), dtype=np.float32)
    return base, unit(base[picks] + 0.5 * noise)


def bandwidth() -> float:
    """Bytes per second of a large numpy copy (read + write counted)."""
    src = np.ones(1 << 27, np.float32)  # 512 MiB
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(3))
    return 2 * src.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def blas_threshold_effect(base: np.ndarray, queries: np.ndarray) -> list[dict]:
    """Exact search time for small query batches: SIMD path vs forcing BLAS."""
    default = faiss.cvar.distance_compute_blas_threshold
    rows = []
    for nq in (1, 4, 16, 64, 256):
        entry: dict = {"queries": nq}
        for name, threshold in (("simd", 1 << 30), ("blas", 1)):
            faiss.cvar.distance_compute_blas_threshold = threshold
            reps = max(3, 64 // nq)
            entry[f"{name}_ms_per_query"] = round(
                1e3
                * min(
                    _timed(lambda q=queries[:nq]: faiss.knn(q, base, 10, METRIC))
                    for _ in range(reps)
                )
                / nq,
                4,
            )
        rows.append(entry)
    faiss.cvar.distance_compute_blas_threshold = default
    return rows


def factories(n: int, chosen: list[str] | None = None) -> list[str]:
    """The factory strings for a gallery of n: `chosen` with {nlist} filled in, or by default
    all types (HNSW and OPQ only up to 100k, for their build time)."""
    nlist = ivf_lists(n)
    if chosen is not None:
        return [name.format(nlist=nlist) for name in chosen]
    names = ["Flat"]
    if n <= 100_000:
        names.append("HNSW32")
    names += [f"IVF{nlist},Flat", f"IVF{nlist},PQ32"]
    if n <= 100_000:
        names.append(f"OPQ32,IVF{nlist},PQ32")
    return names


def check_factories(sizes: list[int], chosen: list[str] | None, dim: int) -> None:
    """Fail before any data is made: a bad string, or more IVF lists than training points."""
    for n in sizes:
        for name in factories(n, chosen):
            index = fi.make_index(name, dim)
            try:
                nlist = faiss.extract_index_ivf(index).nlist
            except RuntimeError:
                continue
            if nlist > n:
                raise ValueError(f"{name!r} has more lists ({nlist}) than vectors ({n})")


def start_report(args: argparse.Namespace) -> dict:
    """A fresh report, or with --merge the one at --out (same dim and threads required)."""
    command = shlex.join(["python", "-m", "bench.index_bench", *sys.argv[1:]])
    report: dict = {
        "host": platform.processor() or platform.machine(),
        "threads": args.threads,
        "dim": args.dim,
        "blas_threshold_used": faiss.cvar.distance_compute_blas_threshold,
        "sizes": {},  # n -> bandwidth floor and query count
        "results": [],  # one row per (n, factory)
        "command": command,
    }
    out = Path(args.out)
    if not (args.merge and out.is_file()):
        return report
    old = json.loads(out.read_text())
    for key in ("dim", "threads"):
        if old.get(key) != report[key]:
            raise ValueError(
                f"cannot merge into {out}: its {key} is {old.get(key)}, not {report[key]}"
            )
    earlier = old.get("command") or "(earlier runs: command not recorded)"
    results = old.get("results", [])
    for n, entry in old.get("sizes", {}).items():  # files written before "results" existed
        results += [{"n": int(n), **row} for row in entry.pop("indexes", [])]
    return {**old, "command": f"{earlier} && {command}", "results": results}


def add_row(results: list[dict], row: dict) -> list[dict]:
    """`results` with `row` replacing any earlier one of the same size and factory."""
    kept = [r for r in results if (r["n"], r["factory"]) != (row["n"], row["factory"])]
    return sorted([*kept, row], key=lambda r: r["n"])  # stable: run order within a size


def bench_index(factory: str, base, queries, truth, target: float, floor_s: float) -> dict:
    shards = [base[i : i + 100_000] for i in range(0, len(base), 100_000)]
    build = time.perf_counter()
    index = fi.build_index(factory, shards, base.shape[1], use_gpu=True)
    build = time.perf_counter() - build
    with tempfile.NamedTemporaryFile() as tmp:
        fi.write_index(index, Path(tmp.name))
        size = Path(tmp.name).stat().st_size
    params, recall = faiss_search.tune(index, queries, truth, target)
    single = [_timed(lambda q=q: index.search(q[None], 10)) for q in queries[:200]]
    batched = min(_timed(lambda: index.search(queries, 10)) for _ in range(2))
    latency = float(np.median(single))
    return {
        "n": len(base),
        "factory": factory,
        "build_s": round(build, 2),
        "bytes": size,
        "search_params": params,
        "recall_at_10": round(recall, 4),
        "single_query_ms_p50": round(1e3 * latency, 3),
        "single_query_ms_p95": round(1e3 * float(np.percentile(single, 95)), 3),
        "batched_qps": round(len(queries) / batched, 1),
        "latency_over_floor": round(latency / floor_s, 2),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="gallery sizes"
    )
    parser.add_argument(
        "--factories",
        nargs="+",
        help="FAISS factory strings to run at every size, {nlist} filled in per size "
        "(default: Flat, HNSW32, IVF{nlist},Flat, IVF{nlist},PQ32, OPQ32,IVF{nlist},PQ32; "
        "HNSW32 and OPQ only up to 100k)",
    )
    parser.add_argument("--dim", type=int, default=256, help="vector dimension")
    parser.add_argument("--queries", type=int, default=1000, help="caption queries per size")
    parser.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="recall@10 that nprobe/efSearch are tuned to reach",
    )
    parser.add_argument("--threads", type=int, default=2, help="FAISS (OpenMP) threads")
    parser.add_argument("--out", default=str(RESULTS / "index_bench.json"), help="JSON results")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep what --out already holds: other sizes, and at a re-run size the factories "
        "not run again (commands joined with &&)",
    )
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    try:
        check_factories(args.sizes, args.factories, args.dim)
        report = start_report(args)
    except ValueError as exc:
        parser.error(str(exc))
    faiss.omp_set_num_threads(args.threads)
    bw = bandwidth()
    print(f"memory bandwidth (numpy copy): {bw / 1e9:.1f} GB/s, threads {args.threads}")
    report["bandwidth_gb_s"] = round(bw / 1e9, 2)  # the latest run's; floors are per size
    for n in args.sizes:
        base, queries = make_data(n, args.dim, args.queries)
        truth = exact_knn(queries, [base], 10)
        floor = n * args.dim * 4 / bw
        report["sizes"][str(n)] = {"floor_ms": round(1e3 * floor, 3), "queries": args.queries}
        if n == args.sizes[0] and "blas_threshold" not in report:
            report["blas_threshold"] = blas_threshold_effect(base, queries)
            print(
                "exact search ms/query by batch size (SIMD loop vs BLAS):",
                report["blas_threshold"],
            )
        print(f"\nN={n} D={args.dim}: bandwidth floor {1e3 * floor:.3f} ms/query")
        for factory in factories(n, args.factories):
            row = bench_index(factory, base, queries, truth, args.target_recall, floor)
            report["results"] = add_row(report["results"], row)
            print(
                f"  {factory:22s} build {row['build_s']:8.2f}s  {row['bytes'] / 2**20:8.1f} MiB  "
                f"recall@10 {row['recall_at_10']:.3f} {row['search_params']}  "
                f"1-query {row['single_query_ms_p50']:.3f} ms "
                f"({row['latency_over_floor']}x floor)  "
                f"batched {row['batched_qps']:.0f} q/s",
                flush=True,
            )
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        del base
    print(f"\nwrote {args.out}")


RECALL = re.compile(r"recall.*10|r@?10", re.I)
LATENCY = re.compile(r"latency|_ms$|ms_|p50", re.I)
SIZE_KEYS = ("gallery", "gallery_size", "size", "n", "count", "vectors", "ntotal", "images")
TYPE_KEYS = ("index_type", "factory", "index", "type", "kind", "method", "name")


def _pick(row: dict, pattern: re.Pattern, avoid: str = "build|batch|qps") -> str | None:
    keys = [k for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    keys = [k for k in keys if pattern.search(k) and not re.search(avoid, k, re.I)]
    preferred = [k for k in keys if re.search(r"single|query|p50|search", k, re.I)]
    return (preferred or keys or [None])[0]


def index_points(data: Any) -> list[dict[str, Any]]:
    """(type, size, recall, latency) from any records carrying a latency, found by key names;
    type and size come from the record or from the keys that lead to it."""
    points = []
    for context, row in records(data):
        latency = _pick(row, LATENCY)
        if latency is None:
            continue
        recall = _pick(row, RECALL, avoid="target")
        # A record without a type names its series by its latency key (e.g. a "floor_ms").
        kind = next((str(row[k]) for k in TYPE_KEYS if isinstance(row.get(k), str)), None)
        kind = kind or latency.rsplit(".", 1)[-1]
        size = next((row[k] for k in SIZE_KEYS if isinstance(row.get(k), int)), None)
        if size is None:
            size = next((int(c) for c in reversed(context) if c.isdigit()), None)
        points.append(
            {
                "type": kind,
                "size": size,
                "recall": row.get(recall) if recall else None,
                "latency": row[latency],
                "latency_key": latency.rsplit(".", 1)[-1],
            }
        )
    return points


def plot_recall_latency(data: Any, out: Path) -> Path | None:
    points = [p for p in index_points(data) if isinstance(p["recall"], int | float)]
    # points of one type come from different gallery sizes: mark each with its size, unjoined
    return _scatter(points, "latency", "recall", "recall@10", out, logx=True, join=False)


def plot_latency_size(data: Any, out: Path) -> Path | None:
    points = [p for p in index_points(data) if isinstance(p["size"], int)]
    return _scatter(points, "size", "latency", "gallery size", out, logx=True, logy=True)


def _scatter(
    points: list[dict],
    x: str,
    y: str,
    label: str,
    out: Path,
    logx: bool,
    logy: bool = False,
    join: bool = True,
) -> Path | None:
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in dict.fromkeys(p["type"] for p in points):
        mine = sorted((p for p in points if p["type"] == kind), key=lambda p: p[x])
        style = "k--" if "floor" in kind else ("o-" if join else "o")  # a floor is a bound
        ax.plot([p[x] for p in mine], [p[y] for p in mine], style, label=kind)
        for p in mine if not join else []:
            if isinstance(p["size"], int):
                ax.annotate(f"{p['size']:,}", (p[x], p[y]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
    unit = " (ms)" if all("ms" in p["latency_key"] for p in points) else ""
    latency_label = f"latency{unit}"
    ax.set_xlabel(latency_label if x == "latency" else label)
    ax.set_ylabel(latency_label if y == "latency" else label)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.legend(fontsize=8)
    return save(fig, out)


FIGURE = Figure(
    "Index types: recall, latency, gallery size",
    "index_bench*.json",
    "python -m bench.index_bench",
    (
        Plot("recall_latency", plot_recall_latency, "recall@10 against latency per index type"),
        Plot("latency_size", plot_latency_size, "latency against gallery size per index type"),
    ),
)


if __name__ == "__main__":
    main()
