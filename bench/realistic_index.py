"""Recall against latency per FAISS index type on a realistic gallery, queried across modalities.

    python -m bench.realistic_index --real cots-data/real-embeddings/openclipart \
        cots-data/real-embeddings/emoji cots-data/real-embeddings/synthetic --size 1000000

The gallery is sampled from bench/realistic_gallery.py's model of real embeddings (N images
and N captions); the queries are held-out real embeddings of the other modality: captions
search the image side (text-to-image), images the caption side (image-to-text). For each
index type and side: build time, resident bytes, and for each search setting recall@10
against exact search and the latency of one query at a time on one thread (the service's
case at concurrency 1), p50. Figures in bench/results/realistic_index.json, the curves in
docs/img/realistic_index.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.figure import Figure, note
from bench.gallery_files import generated
from bench.realistic_gallery import REAL_EMBEDDINGS, add_model_args, shown
from bench.tables import fmt, table
from index_builder.backends.base import ivf_lists
from index_builder.backends.faiss import faiss_index as fi
from index_builder.backends.faiss import search as faiss_search
from index_builder.backends.recall import exact_knn, recall_at_k, sample_rows

ROOT = Path(__file__).resolve().parents[1]
K = 10
# name: (factory with {nlist}, how the coarse quantizer is made query-aware, re-rank depths):
# "gallery" (not at all: trained on the gallery), "both" (trained on both modalities), "gap"
# (lists probed with the query moved across the modality gap, mean(gallery) - mean(other)).
VARIANTS: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "IVF-Flat": ("IVF{nlist},Flat", "gallery", (1,)),
    "IVF-Flat, both modalities": ("IVF{nlist},Flat", "both", (1,)),
    "IVF-Flat, gap-shifted probes": ("IVF{nlist},Flat", "gap", (1,)),
    "IVF-SQ8 + re-rank": ("IVF{nlist},SQ8", "gallery", (1, 2, 4)),
    "IVF-SQfp16 + re-rank": ("IVF{nlist},SQfp16", "gallery", (1, 2)),
    "IVF-HNSW-SQ8 + re-rank": ("IVF{many}_HNSW32,SQ8", "gallery", (2,)),
    "IVF-PQ64x4fs + re-rank": ("IVF{nlist},PQ64x4fs", "gallery", (4, 16)),
    "HNSW32": ("HNSW32", "gallery", (1,)),
}
NPROBES = (4, 8, 16, 32, 64, 128, 256)
EFS = (16, 32, 64, 128, 256, 512)


def build(factory: str, train_on: str, base: np.ndarray, other: np.ndarray) -> tuple[Any, float]:
    index = fi.make_index(factory, base.shape[1])
    started = time.perf_counter()
    sample = sample_rows([base], fi.MAX_TRAIN)
    if train_on == "both":
        sample = np.vstack([sample[: len(sample) // 2], sample_rows([other], len(sample) // 2)])
    index.train(sample)
    for start in range(0, len(base), 100_000):
        index.add(np.ascontiguousarray(base[start : start + 100_000]))
    return index, time.perf_counter() - started


def search(
    index: Any,
    base: np.ndarray,
    queries: np.ndarray,
    *,
    param: str | None,
    value: int,
    rerank: int,
    shift: np.ndarray | None = None,
) -> np.ndarray:
    """Rows of the top K, re-ranked exactly from `base` over rerank * K candidates; with
    `shift`, the IVF lists probed are those nearest the query moved by `shift`."""
    if param is not None:
        fi.set_search_params(index, {param: value})
    if shift is None:
        rows = index.search(queries, K * rerank)[1]
    else:
        moved = queries + shift
        moved /= np.linalg.norm(moved, axis=1, keepdims=True)
        scores, lists = index.quantizer.search(moved, value)
        rows = index.search_preassigned(queries, K * rerank, lists, scores)[1]
    if rerank == 1:
        return rows
    return faiss_search.rerank(base, queries, rows, K)[1]


def latency_ms(fn: Any, queries: np.ndarray) -> float:
    times = []
    for q in queries:
        start = time.perf_counter()
        fn(q[None])
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def measure(
    name: str, base: np.ndarray, other: np.ndarray, queries: np.ndarray, single: int
) -> dict[str, Any]:
    factory, train_on, depths = VARIANTS[name]
    n = len(base)
    factory = factory.format(nlist=ivf_lists(n), many=2 * ivf_lists(n))
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index, seconds = build(factory, train_on, base, other)
    truth = exact_knn(queries, [base], K)
    param = fi.tunable_param(index)
    shift = None
    if train_on == "gap":
        shift = (np.mean(base[::10], 0) - np.mean(other[::10], 0)).astype(np.float32)
    values = NPROBES if param == "nprobe" else EFS if param else (0,)
    points = []
    for value in values:
        for rerank in depths:
            faiss.omp_set_num_threads(os.cpu_count() or 1)
            rows = search(
                index, base, queries, param=param, value=value, rerank=rerank, shift=shift
            )
            faiss.omp_set_num_threads(1)
            ms = latency_ms(
                partial(search, index, base, param=param, value=value, rerank=rerank, shift=shift),
                queries[:single],
            )
            recall = recall_at_k(rows, truth)
            points.append(
                {param or "exact": value, "rerank": rerank, "recall": recall, "p50_ms": ms}
            )
            print(
                f"  {name} {param}={value} rerank={rerank}: recall {recall:.3f}, {ms:.2f} ms",
                flush=True,
            )
    return {
        "factory": factory,
        "trained_on": train_on,
        "build_seconds": round(seconds, 1),
        "bytes": len(faiss.serialize_index(index)),
        "points": points,
    }


def picture(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, (direction, variants) in zip(axes, results.items(), strict=True):
        for name, result in variants.items():
            best: dict[int, list[tuple[float, float]]] = {}
            for p in result["points"]:
                best.setdefault(p["rerank"], []).append((p["p50_ms"], p["recall"]))
            for rerank, curve in best.items():
                xs, ys = zip(*sorted(curve), strict=True)
                label = name if len(best) == 1 else f"{name}, {rerank * K} candidates"
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.axhline(0.95, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("p50 latency of one query, one thread (ms)")
        ax.set_ylabel("recall@10 against exact search")
        ax.set_title(direction)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--size", type=int, default=1_000_000, help="items per side")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries per side")
    parser.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add the variants measured to those already in --out (same size and queries)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/realistic_index.json")
    parser.add_argument("--picture", type=Path, default=ROOT / "docs/img/realistic_index.png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images, captions, held_out = generated(args)
    rng = np.random.default_rng(0)
    pick = lambda x: np.ascontiguousarray(x[rng.permutation(len(x))[: args.queries]])  # noqa: E731
    sides = {
        "text-to-image (caption queries, image side)": (images, captions, pick(held_out.captions)),
        "image-to-text (image queries, caption side)": (captions, images, pick(held_out.images)),
    }
    before = json.loads(args.out.read_text()) if args.merge and args.out.is_file() else {}
    if before and (before["size"], before["queries"]) != (args.size, args.queries):
        raise SystemExit(f"--merge: {args.out} holds another size or query count")
    results: dict[str, Any] = before.get("results", {})
    command = shlex.join(["python", "-m", "bench.realistic_index", *sys.argv[1:]])
    if before.get("command"):
        command = f"{before['command']} && {command}"
    for direction, (base, other, queries) in sides.items():
        print(direction, flush=True)
        measured = results.setdefault(direction, {})
        for name in args.variants:
            measured[name] = measure(name, base, other, queries, args.single)
    picture(results, args.picture)
    out = {
        "size": args.size,
        "queries": args.queries,
        "k": K,
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
        "results": results,
        "picture": shown(args.picture),
        "command": command,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


RECALL_GOAL = 0.95


def _setting(point: dict) -> str:
    """`nprobe=64, rerank 2` from a point of realistic_index (`exact` for a flat index)."""
    param = next(k for k in point if k not in ("rerank", "recall", "p50_ms"))
    name = param if param == "exact" else f"{param}={fmt(point[param])}"
    return f"{name}, rerank {fmt(point.get('rerank'))}"


def index_type_row(name: str, variant: dict) -> dict[str, Any]:
    """One index type: its size and build time, the lowest-latency setting that reaches
    RECALL_GOAL, and the best recall it reaches at all (the faster setting on a tie)."""
    points = variant.get("points", [])
    reaching = [p for p in points if p["recall"] >= RECALL_GOAL]
    cheapest: dict = min(reaching, key=lambda p: p["p50_ms"], default={})
    best: dict = min(points, key=lambda p: (-p["recall"], p["p50_ms"]), default={})
    setting = _setting(cheapest) if cheapest else "not reached"
    return {
        "variant": name,
        "factory": variant.get("factory"),
        "build s": variant.get("build_seconds"),
        "MB": variant["bytes"] / 1e6 if isinstance(variant.get("bytes"), int) else None,
        f"cheapest setting to recall {RECALL_GOAL}": setting,
        "its recall": cheapest.get("recall"),
        "its p50 ms": cheapest.get("p50_ms"),
        "best recall": best.get("recall"),
        "best recall's p50 ms": best.get("p50_ms"),
    }


def index_type_tables(data: dict) -> str:
    """realistic_index: per query direction, one row per index type (index_type_row)."""
    head = (
        f"{fmt(data.get('size'))} items per side, {fmt(data.get('queries'))} held-out real "
        f"queries per direction; recall@{fmt(data.get('k'))} against exact search."
    )
    parts = [head]
    for direction, variants in data.get("results", {}).items():
        rows = [index_type_row(name, variant) for name, variant in variants.items()]
        parts += [f"**{direction}**", table(rows)]
    return "\n\n".join(parts)


FIGURE = Figure(
    "Index types on a realistic gallery, cross-modal queries",
    "realistic_index*.json",
    f"python -m bench.realistic_index --real {REAL_EMBEDDINGS} --size 1000000",
    note=note("realistic_index"),
    render=index_type_tables,
)


if __name__ == "__main__":
    sys.exit(main())
