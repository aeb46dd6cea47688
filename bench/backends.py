"""FAISS files against a Milvus server behind the same interface: build time, recall@10
against exact search, query latency, filtered search, and the cost of changes (add, upsert
and delete 1% of the gallery) while queries run, on one synthetic gallery.

    python -m bench.backends --size 100000 --threads 2

Milvus is a real Milvus 2.3.5 standalone server (`cots milvus start`'s, on free ports with
its data in a temporary directory, or --milvus-uri), on the same host, sharing its cores.
A Milvus change is made in place in the current collection (backends/milvus/change.py); a
FAISS change writes a new version (the reader reopens it). Vectors are clustered like
embeddings (collection_bench.make_data); queries are noisy copies of items (another modality
near, not on, the gallery). Searches go through `Version.search`, the path the service takes,
one query per call (the latency a request sees) and in batches of 32. While each change
runs, a thread searches the version opened before it; a failed search is counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from bench.collection_bench import make_data, rows_for, unit
from bench.figure import Figure, command_line
from bench.tables import table
from index_builder import collection
from index_builder.backends import BackendConfig, open_store
from index_builder.backends.base import IndexOptions
from index_builder.backends.milvus import server

RESULTS = Path(__file__).parent / "results"
FILTER = {"bucket": {"lt": 10}}  # 10% of the gallery


def build_store(
    backend: str, root: Path, uri: str, index: str, vectors: np.ndarray, buckets: np.ndarray
):
    name = f"bench_{index.lower()}"
    config = BackendConfig("milvus", milvus_uri=uri, milvus_index=index, milvus_collection=name)
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


class Traffic:
    """Searches of one loaded version in a thread, one query at a time, until stopped;
    failures are counted (a change must not fail a request)."""

    def __init__(self, loaded, queries: np.ndarray) -> None:
        self.loaded, self.queries = loaded, queries
        self.done = self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.loaded.search("image", self.queries[self.done % len(self.queries)][None], 10)
            except Exception:
                self.failed += 1
            self.done += 1

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def visible(store, vector: np.ndarray, item_id: str, present: bool, started: float) -> float:
    """Seconds from `started` until a reader that opens the current version finds (or no
    longer finds) `item_id` as the top hit of `vector` (another process's view)."""
    while True:
        reader = store.open()
        _, found = reader.search("image", vector[None], 1)
        top = [r["id"] for r in reader.rows_at("image", found[0][found[0] >= 0])]
        if (item_id in top) == present:
            return time.perf_counter() - started
        if time.perf_counter() - started > 60:
            return float("inf")
        time.sleep(0.05)


def changes(store, loaded, queries, size: int, dim: int) -> dict:
    """Seconds to add 1% of the gallery, upsert 1% (new vectors for present ids) and delete
    1% (embedding not included), each under search traffic; when each is visible to a reader
    opened afresh (from the change's start), and the searches that failed meanwhile."""
    count = size // 100
    extra, buckets = make_data(count, dim, seed=7)
    moved, _ = make_data(count, dim, seed=8)  # the upserted items' new vectors
    result: dict = {"items": count, "failed_requests": 0, "searches_during": 0}
    steps = [
        ("add", rows_for(range(count), buckets, "new"), extra, "new0", True),
        ("upsert", rows_for(range(count), buckets, "i"), moved, "i0", True),
        ("delete", None, extra, "new0", False),
    ]
    for name, rows, vectors, probe, present in steps:
        with Traffic(loaded, queries) as traffic:
            started = time.perf_counter()
            if rows is None:
                collection.delete_ids(store, [f"new{i}" for i in range(count)])
            else:
                request = collection.Change(
                    rows={"image": rows}, vectors={"image": vectors}, upsert=name == "upsert"
                )
                collection.change(store, store.open(), request)
            result[f"{name}_1pct_seconds"] = round(time.perf_counter() - started, 2)
            result[f"{name}_visible_seconds"] = round(
                visible(store, vectors[0], probe, present, started), 2
            )
        result["failed_requests"] += traffic.failed
        result["searches_during"] += traffic.done
    return result


def run(backend: str, index: str, root: Path, uri: str, args, data) -> dict:
    vectors, buckets, queries = data
    store, seconds = build_store(backend, root, uri, index, vectors, buckets)
    loaded = store.open()
    side = loaded.info["sides"]["image"]
    print(f"{backend}: built {side['factory']} in {seconds:.1f} s", flush=True)
    result = {
        "backend": "faiss" if backend == "faiss" else "milvus 2.3.5 standalone server",
        "index": side["factory"],
        "search_params": side["search_params"],
        "build_seconds": round(seconds, 1),
        "recorded_recall_at_10": side["recall_at_10"],
        "search": measure(loaded, vectors, buckets, queries),
        "filtered_10pct": measure(loaded, vectors, buckets, queries[: args.filtered], FILTER),
        "changes": changes(store, loaded, queries, args.size, args.dim),
    }
    print(result, flush=True)
    return result


@contextlib.contextmanager
def milvus_server(uri: str | None, root: Path) -> Iterator[str]:
    """`uri`, or a fresh local server (`cots milvus start`'s) for the run."""
    if uri:
        yield uri
        return
    port, metrics_port = server.free_ports(2)
    state = server.start(root / "milvus-server", port, metrics_port)
    try:
        yield state.uri
    finally:
        server.stop(root / "milvus-server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="gallery items")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--queries", type=int, default=200, help="queries per measurement")
    parser.add_argument("--filtered", type=int, default=100, help="queries for filtered search")
    parser.add_argument("--milvus-uri", help="a running Milvus server (default: start one)")
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
    with tempfile.TemporaryDirectory() as tmp, milvus_server(args.milvus_uri, Path(tmp)) as uri:
        runs = [run("faiss", "AUTO", Path(tmp) / "f", uri, args, data)]
        runs += [run("milvus", i, Path(tmp) / f"m-{i}", uri, args, data) for i in args.milvus_index]
    result = {
        "command": command_line("backends", sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.2f} at the end",
        "note": "Milvus 2.3.5 standalone on the same host (its cores shared with the bench); "
        "Milvus changes are made in place, FAISS changes are new versions",
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
            **change_columns(run),
        }
        for run in data.get("runs", [])
    ]
    note = f"{data['note'][0].upper()}{data['note'][1:]}.\n\n" if data.get("note") else ""
    size = f"{data.get('size')} items of dimension {data.get('dim')}.\n\n"
    return note + size + table(rows)


def change_columns(run: dict) -> dict:
    """The changes under search traffic: seconds each took, when a fresh reader saw it, and
    the searches that failed meanwhile (a result from before them: only the add)."""
    if "changes" not in run:
        return {"add 1%, s": run["add_1pct_seconds"]}
    changes = run["changes"]
    return {
        **{f"{n} 1%, s": changes[f"{n}_1pct_seconds"] for n in ("add", "upsert", "delete")},
        "upsert visible, s": changes["upsert_visible_seconds"],
        "failed searches": f"{changes['failed_requests']} of {changes['searches_during']}",
    }


FIGURE = Figure(
    "Search backends: FAISS files and a Milvus server",
    "backends*.json",
    "python -m bench.backends --size 100000 --threads 2",
    render=backend_tables,
)


if __name__ == "__main__":
    main()
