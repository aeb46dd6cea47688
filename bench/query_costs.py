"""What a query costs in each code layout at one size (issue 27): the automatic IVF quantizer
with 8-bit scalar codes against 4-bit PQ fast-scan codes (one per dimension), each tuned as a
build tunes it, timed as the service searches: a lone query on one and on two threads
(`faiss_index.split_lists`), and batches on one thread, the exact re-rank by pread included.

    python -m bench.query_costs --real cots-data/real-embeddings/openclipart \\
        cots-data/real-embeddings/emoji cots-data/real-embeddings/synthetic --size 10000000

Text-to-image over the generated gallery (bench/gallery_files.py) with held-out real caption
queries; recall@10 against exact search. Results: bench/results/query_costs.json, with
bench/calibration.py's figures before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import faiss
import numpy as np

from bench import calibration
from bench.figure import command_line
from bench.gallery_files import generated
from bench.realistic_gallery import RESULTS, add_model_args
from index_builder.backends import recall as rc
from index_builder.backends.base import ivf_lists
from index_builder.backends.faiss import faiss_index as fi
from index_builder.backends.faiss import search as fs
from index_builder.backends.recall import exact_knn, recall_at_k, sample_rows

K, GOAL = 10, 0.95
CODES = ("SQ8", "PQ{dim}x4fs")


def lone_ms(index: Any, stored: np.ndarray, queries: np.ndarray, depth: int, threads: int) -> float:
    """Median ms of one query searched alone on `threads` threads, re-rank included."""
    faiss.omp_set_num_threads(threads)
    spent = []
    for query in queries:
        started = time.perf_counter()
        fs.search_index(index, stored, query[None], K, None, depth)
        spent.append(time.perf_counter() - started)
    return round(float(np.median(spent)) * 1000, 3)


def batch_ms(index: Any, stored: np.ndarray, queries: np.ndarray, depth: int, size: int) -> float:
    """Mean ms a query in batches of `size` on one thread (how a loaded service searches)."""
    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    for start in range(0, len(queries), size):
        fs.search_index(index, stored, queries[start : start + size], K, None, depth)
    return round((time.perf_counter() - started) * 1000 / len(queries), 3)


def layout(factory: str, images: np.ndarray, captions: np.ndarray, queries: np.ndarray,
           truth: np.ndarray, timed: int) -> dict[str, Any]:  # fmt: skip
    """One layout built, tuned with the margin on gallery captions, served and timed."""
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    index = fi.build_index(factory, [images], images.shape[1], use_gpu=False)
    built = time.perf_counter() - started
    tuning = sample_rows([captions], 1000, seed=1)
    params, tuned = fs.tune(
        index, tuning, exact_knn(tuning, [images], K), GOAL, stored=images, margin=rc.TUNE_MARGIN
    )
    depth = params.get("rerank", 1)
    served = recall_at_k(fs.search_index(index, images, queries, K, None, depth)[1], truth)
    fi.split_lists(index)
    out = {
        "factory": factory,
        "build_seconds": round(built, 1),
        "index_bytes": len(faiss.serialize_index(index)),
        "params": params,
        "tuned_recall": round(tuned, 4),
        "served_recall": round(served, 4),
        "lone_ms_1_thread": lone_ms(index, images, queries[:timed], depth, 1),
        "lone_ms_2_threads": lone_ms(index, images, queries[:timed], depth, 2),
        "batch_8_ms_a_query": batch_ms(index, images, queries, depth, 8),
    }
    print(f"  {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--size", type=int, default=1_000_000, help="items per side")
    parser.add_argument("--queries", type=int, default=400, help="held-out queries")
    parser.add_argument("--timed", type=int, default=200, help="lone queries timed")
    parser.add_argument("--out", default="bench/results/query_costs.json")
    args = parser.parse_args(argv)
    images, captions, held = generated(args)
    rng = np.random.default_rng(0)
    queries = np.ascontiguousarray(held.captions[rng.permutation(len(held.captions))])
    queries = queries[: args.queries]
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    truth = exact_knn(queries, [images], K)
    nlist, dim = ivf_lists(args.size), images.shape[1]
    ivf = f"IVF{nlist}_HNSW32" if nlist >= fi.HNSW_LISTS else f"IVF{nlist}"
    out: dict[str, Any] = {
        "size": args.size,
        "queries": len(queries),
        "calibration": calibration.rates(),
        "command": command_line("query_costs", sys.argv[1:] if argv is None else argv),
        "layouts": [],
    }
    print(f"calibration: {out['calibration']}", flush=True)
    for code in CODES:
        factory = f"{ivf},{code.format(dim=dim)}"
        out["layouts"].append(layout(factory, images, captions, queries, truth, args.timed))
    out["calibration_after"] = calibration.rates()
    path = RESULTS.parent.parent / args.out
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(temp, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
