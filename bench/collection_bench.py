"""Filtered search and live changes on a 100k collection: recall@10 against exact filtered
search and latency at 1%, 10% and 50% selectivity; the cost of changing 1% of the gallery
(add, delete, upsert) against a full rebuild.

    python -m bench.collection_bench --size 100000 --threads 2

Vectors are synthetic but clustered like embeddings (items around cluster centres, queries
noisy copies of other items: another modality near, not on, the gallery); a numeric metadata
field `bucket` (0..99, uniform) gives the selectivities. Embedding the new items is not
included in the change cost (measure it with bench/embed_throughput.py).
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

from bench.figure import Figure, command_line
from index_builder import collection
from index_builder.backends.base import IndexOptions
from index_builder.backends.faiss import faiss_index
from index_builder.backends.faiss import search as faiss_search
from index_builder.backends.faiss.store import IndexStore

RESULTS = Path(__file__).parent / "results"
SELECTIVITY = {"1%": {"bucket": 0}, "10%": {"bucket": {"lt": 10}}, "50%": {"bucket": {"lt": 50}}}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((max(16, n // 200), dim)))
    items = unit(
        centres[rng.integers(0, len(centres), n)]
        + 0.6 * rng.standard_normal((n, dim)) / np.sqrt(dim) * 4
    )
    return items, rng.integers(0, 100, n)


def rows_for(ids: range, buckets: np.ndarray, prefix: str = "i") -> list[dict]:
    return [{"id": f"{prefix}{i}", "image": "", "captions": [], "meta": {"bucket": int(b)}}
            for i, b in zip(ids, buckets, strict=True)]  # fmt: skip


def publish(store: IndexStore, vectors: np.ndarray, buckets: np.ndarray) -> float:
    started = time.perf_counter()
    store.publish(
        bundle_id="bench",
        dim=vectors.shape[1],
        shards={"image": [vectors]},
        rows={"image": rows_for(range(len(vectors)), buckets)},
        options=IndexOptions(queries=500),
        dataset={"name": "synthetic"},
    )
    return time.perf_counter() - started


def filtered(store: IndexStore, vectors: np.ndarray, queries: np.ndarray) -> list[dict]:
    loaded = store.open()
    out = []
    for label, filter in {"none": None, **SELECTIVITY}.items():
        times, found = [], []
        for query in queries:
            started = time.perf_counter()
            mask = loaded.filter_mask("image", filter)
            found.append(loaded.search("image", query[None], 10, mask)[1][0])
            times.append(time.perf_counter() - started)
        allowed = np.ones(len(vectors), bool) if mask is None else mask
        rows = np.flatnonzero(allowed)
        param = faiss_index.tunable_param(loaded.indexes["image"])
        exact = mask is not None and faiss_search.exact_subset(len(rows), len(mask), param)
        truth = faiss.knn(queries, np.ascontiguousarray(vectors[rows]), 10)[1]
        recall = np.mean([len(set(f.tolist()) & set(rows[t].tolist())) / 10
                          for f, t in zip(found, truth, strict=True)])  # fmt: skip
        out.append({
            "selectivity": label,
            "allowed_rows": int(allowed.sum()),
            "path": "exact subset" if exact else "index" if mask is None else "index + selector",
            "recall_at_10": round(float(recall), 4),
            "p50_ms": round(float(np.percentile(times, 50)) * 1000, 3),
            "p99_ms": round(float(np.percentile(times, 99)) * 1000, 3),
        })  # fmt: skip
        print(out[-1], flush=True)
    return out


def changes(store: IndexStore, n: int, dim: int) -> list[dict]:
    count = n // 100
    extra, buckets = make_data(count, dim, seed=7)
    out = []
    cases = {
        "add 1%": collection.Change(
            rows={"image": rows_for(range(count), buckets, "new")}, vectors={"image": extra}
        ),
        "upsert 1%": collection.Change(
            rows={"image": rows_for(range(count), buckets)}, vectors={"image": extra}, upsert=True
        ),
        "delete 1%": collection.Change(
            delete={"image": {f"i{i}" for i in range(count, 2 * count)}}
        ),
    }
    for label, request in cases.items():
        started = time.perf_counter()
        result = collection.change(store, store.open(), request)
        seconds = time.perf_counter() - started
        info = store.read_info(result.version)["sides"]["image"]
        out.append({"change": label, "items": count, "seconds": round(seconds, 2),
                    "recall_at_10": info["recall_at_10"], "live": info["count"],
                    "tombstones": info["deleted"]})  # fmt: skip
        print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="gallery items")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--queries", type=int, default=200, help="queries per selectivity")
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads")
    parser.add_argument("--out", default=str(RESULTS / "collection.json"), help="result file")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    vectors, buckets = make_data(args.size, args.dim)
    queries = unit(vectors[: args.queries] + 0.05 * np.random.default_rng(3).standard_normal(
        (args.queries, args.dim)).astype(np.float32))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        store = IndexStore(Path(tmp) / "idx")
        rebuild = publish(store, vectors, buckets)
        factory = store.read_info()["sides"]["image"]["factory"]
        print(f"built {factory} over {args.size} items in {rebuild:.1f} s", flush=True)
        result = {
            "command": command_line("collection_bench", sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
            "size": args.size,
            "dim": args.dim,
            "factory": factory,
            "full_build_seconds": round(rebuild, 2),
            "filtered_search": filtered(store, vectors, queries),
            "changes": changes(store, args.size, args.dim),
        }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


FIGURE = Figure(
    "Filtered search and live changes of a collection",
    "collection*.json",
    "python -m bench.collection_bench --size 100000 --threads 2",
)


if __name__ == "__main__":
    main()
