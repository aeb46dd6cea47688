"""FAISS files against Milvus (milvus-lite here) behind the same interface: build time,
recall@10 against exact search, query latency, filtered search and the cost of a change,
on one synthetic gallery.

    python -m bench.backends --size 100000 --threads 2

milvus-lite is the embedded edition: one process, a gRPC server in threads over FAISS and
Arrow files. It is not a Milvus cluster (query nodes, segment sealing, GPU indexes), so its
latency says what the interface costs on one host, not what a cluster serves. Vectors are
clustered like embeddings (collection_bench.make_data); queries are noisy copies of items
(another modality near, not on, the gallery). Searches go through `Version.search`, the path
the service takes, one query per call (the latency a request sees) and in batches of 32.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from bench.collection_bench import make_data, rows_for, unit
from bench.figure import Figure, command_line
from bench.tables import table
from index_builder import collection
from index_builder.backends import BackendConfig, open_store
from index_builder.backends.base import IndexOptions

RESULTS = Path(__file__).parent / "results"
FILTER = {"bucket": {"lt": 10}}  # 10% of the gallery


def build_store(backend: str, root: Path, index: str, vectors: np.ndarray, buckets: np.ndarray):
    config = BackendConfig("milvus", milvus_uri=str(root / "m.db"), milvus_index=index)
    store = open_store(root / backend, config if backend == "milvus" else None)
    started = time.perf_counter()
    store.publish(
        bundle_id="bench",
        dim=vectors.shape[1],
        shards={"image": [vectors]},
        rows={"image": rows_for(range(len(vectors)), buckets)},
        options=IndexOptions(queries=500, target_recall=0.95, use_gpu=False),
        dataset={"name": "synthetic"},
    )
    return store, time.perf_counter() - started


def measure(loaded, vectors, buckets, queries, filter=None) -> dict:
    """Recall@10 against exact search over the rows the filter allows, latency one by one
    (p50, p99) and per query in batches of 32."""
    allowed = np.ones(len(vectors), bool) if filter is None else buckets < 10
    rows = np.flatnonzero(allowed)
    truth = rows[faiss.knn(queries, np.ascontiguousarray(vectors[rows]), 10)[1]]
    times, found = [], []
    for query in queries:
        started = time.perf_counter()
        _, hit = loaded.search("image", query[None], 10, filter=filter)
        times.append(time.perf_counter() - started)
        ids = loaded.rows_at("image", hit[0][hit[0] >= 0])
        found.append({int(item["id"][1:]) for item in ids})
    started = time.perf_counter()
    for start in range(0, len(queries), 32):
        loaded.search("image", queries[start : start + 32], 10, filter=filter)
    batched = (time.perf_counter() - started) / len(queries)
    recall = np.mean([len(f & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)])
    return {
        "recall_at_10": round(float(recall), 4),
        "p50_ms": round(float(np.percentile(times, 50)) * 1000, 2),
        "p99_ms": round(float(np.percentile(times, 99)) * 1000, 2),
        "batch32_ms_per_query": round(batched * 1000, 2),
    }


def change_cost(store, n: int, dim: int) -> float:
    """Seconds to add 1% of the gallery (embedding not included)."""
    count = n // 100
    extra, buckets = make_data(count, dim, seed=7)
    request = collection.Change(
        rows={"image": rows_for(range(count), buckets, "new")}, vectors={"image": extra}
    )
    started = time.perf_counter()
    collection.change(store, store.open(), request)
    return time.perf_counter() - started


def run(backend: str, index: str, root: Path, args, data) -> dict:
    vectors, buckets, queries = data
    store, seconds = build_store(backend, root, index, vectors, buckets)
    loaded = store.open()
    side = loaded.info["sides"]["image"]
    print(f"{backend}: built {side['factory']} in {seconds:.1f} s", flush=True)
    result = {
        "backend": "faiss" if backend == "faiss" else "milvus-lite (embedded, one process)",
        "index": side["factory"],
        "search_params": side["search_params"],
        "build_seconds": round(seconds, 1),
        "recorded_recall_at_10": side["recall_at_10"],
        "search": measure(loaded, vectors, buckets, queries),
        "filtered_10pct": measure(loaded, vectors, buckets, queries[: args.filtered], FILTER),
        "add_1pct_seconds": round(change_cost(store, args.size, args.dim), 1),
    }
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="gallery items")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--queries", type=int, default=200, help="queries per measurement")
    parser.add_argument(
        "--filtered",
        type=int,
        default=40,
        help="queries for filtered search (milvus-lite "
        "evaluates JSON filters in Python: seconds per query at 100k)",
    )
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads (both backends)")
    parser.add_argument(
        "--milvus-index", default=["AUTO"], nargs="+", help="Milvus index types to compare"
    )
    parser.add_argument("--out", default=str(RESULTS / "backends.json"), help="result file")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    vectors, buckets = make_data(args.size, args.dim)
    rng = np.random.default_rng(3)
    picks = rng.integers(0, args.size, args.queries)
    noise = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    queries = unit(vectors[picks] + 0.05 * noise)
    data = (vectors, buckets, queries)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run("faiss", "AUTO", Path(tmp) / "f", args, data)]
        runs += [run("milvus", i, Path(tmp) / f"m-{i}", args, data) for i in args.milvus_index]
    result = {
        "command": command_line("backends", sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "note": "milvus-lite is the embedded edition (a gRPC server in the searching process "
        "over FAISS and Arrow files), not a Milvus cluster: its figures are the interface's "
        "cost on one host, not a cluster's throughput",
        "size": args.size,
        "dim": args.dim,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def backend_tables(data: dict) -> str:
    """One row per backend run: index, build, recall (recorded and measured), latency,
    filtered search and the cost of a change; the result's own caveat first."""
    rows = [
        {
            "backend": run["backend"],
            "index": run["index"],
            "search params": run["search_params"],
            "build s": run["build_seconds"],
            "recall@10 recorded": run["recorded_recall_at_10"],
            "recall@10": run["search"]["recall_at_10"],
            "p50 ms": run["search"]["p50_ms"],
            "p99 ms": run["search"]["p99_ms"],
            "batch 32, ms/query": run["search"]["batch32_ms_per_query"],
            "filtered 10%: recall@10": run["filtered_10pct"]["recall_at_10"],
            "filtered 10%: p50 ms": run["filtered_10pct"]["p50_ms"],
            "add 1%, s": run["add_1pct_seconds"],
        }
        for run in data.get("runs", [])
    ]
    note = f"{data['note'][0].upper()}{data['note'][1:]}.\n\n" if data.get("note") else ""
    size = f"{data.get('size')} items of dimension {data.get('dim')}.\n\n"
    return note + size + table(rows)


FIGURE = Figure(
    "Search backends: FAISS files and Milvus (milvus-lite)",
    "backends*.json",
    "python -m bench.backends --size 100000 --threads 2",
    render=backend_tables,
)


if __name__ == "__main__":
    main()
