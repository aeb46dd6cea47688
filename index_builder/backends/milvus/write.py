"""Filling a Milvus version's collection: batches of rows and vectors inserted per side (the
exact top-k of recall's queries computed while streaming them), the index waited for, and
search parameters tuned to the recall target."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from index_builder.backends.base import OTHER
from index_builder.backends.milvus.client import (
    ID_LENGTH,
    add_index,
    choose_index,
    create_collection,
    errors,
    search_grid,
    segment_rows,
    wait_indexed,
)
from index_builder.backends.recall import METRIC, recall_at_k, tuning_target
from index_builder.filters import field_types, merge_field_types

log = logging.getLogger(__name__)
K = 10
BATCH = 2000  # rows per insert and per copied batch
Batch = tuple[list[dict[str, Any]], np.ndarray, np.ndarray]  # rows, row numbers, vectors


@dataclass
class Draft:
    """What a new version is made of: its record's fields, each side's row count, batches of
    rows and vectors, and the queries (with a recall target) its recall is measured with."""

    bundle_id: str
    bundle_path: Any
    dim: int
    dataset: dict[str, Any]
    parent: str | None
    next_row: int
    counts: dict[str, int]
    batches: dict[str, Iterator[Batch]]
    queries: dict[str, np.ndarray]
    target: float
    skipped: dict[str, Any]


def entity(row: dict[str, Any], number: int, vector: np.ndarray) -> dict[str, Any]:
    item_id = str(row["id"])
    if len(item_id.encode()) > ID_LENGTH:
        raise ValueError(f"item id longer than {ID_LENGTH} bytes: {item_id[:60]!r}...")
    item = {key: value for key, value in row.items() if key not in ("id", "meta")}
    return {
        "row": number,
        "id": item_id,
        "image_id": str(row.get("image_id") or ""),
        "vector": vector,
        "meta": row.get("meta") or {},
        "item": item,
    }


def batches_from_shards(
    rows: list[dict[str, Any]], shards: Sequence[np.ndarray], start: int
) -> Iterator[Batch]:
    """Batches of a side built from embedding shards; row numbers from `start`."""
    done = 0
    for shard in shards:
        for i in range(0, len(shard), BATCH):
            vectors = np.ascontiguousarray(shard[i : i + BATCH], dtype=np.float32)
            numbers = np.arange(start + done, start + done + len(vectors), dtype=np.int64)
            yield rows[done : done + len(vectors)], numbers, vectors
            done += len(vectors)


def batches_from_arrays(
    rows: list[dict[str, Any]], numbers: np.ndarray, vectors: np.ndarray | None
) -> Iterator[Batch]:
    if not rows:
        return
    assert vectors is not None, "new rows come with their vectors"
    for i in range(0, len(rows), BATCH):
        yield (
            rows[i : i + BATCH],
            numbers[i : i + BATCH],
            np.ascontiguousarray(vectors[i : i + BATCH], dtype=np.float32),
        )


def query_side(side: str, counts: dict[str, int]) -> str:
    return OTHER[side] if counts.get(OTHER[side]) else side


def build_collection(
    client: Any, uri: str, collection: str, draft: Draft, kind: str, params: dict[str, Any]
) -> dict[str, Any]:
    """The collection filled, indexed (`choose_index(kind, params, ...)` once its segments
    are sealed), loaded and tuned: its sides' records."""
    started = time.perf_counter()
    lite = uri.endswith(".db")
    with errors(uri, f"create collection {collection}"):
        create_collection(client, collection, draft.dim, list(draft.counts), lite)
    truths, fields = {}, {}
    for side in draft.counts:
        truths[side], fields[side] = fill_side(
            client, uri, collection, side, draft.batches[side], draft.queries[side]
        )
    with errors(uri, f"index collection {collection}"):
        client.flush(collection)
        total = sum(draft.counts.values())
        kind, params = choose_index(kind, params, total, segment_rows(client, collection, lite))
        log.info("%s: %s %s over %d rows", collection, kind, params, total)
        add_index(client, collection, kind, params)
        wait_indexed(client, collection)
        client.load_collection(collection)
    seconds = round(time.perf_counter() - started, 3)
    sides = {}
    for side, count in draft.counts.items():
        info = {
            "factory": kind,
            "index_type": kind,
            "index_params": params,
            "count": count,
            "rows": count,
            "deleted": 0,
            "fields": fields[side],
            "skipped": draft.skipped.get(side) or {"count": 0, "examples": []},
            "query_side": query_side(side, draft.counts),
        }
        queries, target = draft.queries[side], draft.target
        info.update(tune_side(client, uri, collection, side, info, queries, truths[side], target))
        sides[side] = {**info, "build_seconds": seconds}
    return sides


def fill_side(
    client: Any, uri: str, collection: str, side: str, batches: Iterator[Batch], queries: np.ndarray
) -> tuple[np.ndarray, dict[str, str]]:
    """Insert a side's batches; returns the exact top-k row numbers of `queries` among
    them (recall's reference, computed while streaming) and the metadata field types."""
    heap = faiss.ResultHeap(len(queries), K, keep_max=True)
    kinds: dict[str, str] = {}
    for rows, numbers, vectors in batches:
        entities = [
            entity(row, int(n), v) for row, n, v in zip(rows, numbers, vectors, strict=True)
        ]
        with errors(uri, f"insert into {collection}"):
            client.insert(collection, entities, partition_name=side)
        kinds = merge_field_types(kinds, field_types(row.get("meta") or {} for row in rows))
        if len(queries):
            scores, local = faiss.knn(queries, vectors, min(K, len(vectors)), METRIC)
            pad = K - local.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            found = np.pad(numbers[local], ((0, 0), (0, pad)), constant_values=-1)
            heap.add_result(scores, found)
    heap.finalize()
    return heap.I, kinds


def tune_side(
    client: Any,
    uri: str,
    collection: str,
    side: str,
    info: dict[str, Any],
    queries: np.ndarray,
    truth: np.ndarray,
    target: float,
) -> dict[str, Any]:
    """The cheapest search parameters reaching `target` recall@10, raised by the tuning
    margin (`recall.tuning_target`: the tuning queries are easier than real ones), else the
    best tried."""
    k = min(K, info["count"])
    measured: dict[str, Any] = {
        "search_params": {},
        "recall_at_10": None,
        "target_recall": target,
        "queries": len(queries),
    }
    if k == 0 or not len(queries):
        return measured
    best: tuple[dict[str, int], float] = ({}, -1.0)
    for params in search_grid(info["index_type"], info["index_params"], k):
        with errors(uri, f"search {collection}"):
            results = client.search(
                collection,
                data=list(queries),
                limit=k,
                partition_names=[side],
                search_params={"metric_type": "IP", "params": params},
                anns_field="vector",
                consistency_level="Strong",
            )
        found = np.array([[int(h.pk) for h in hits] + [-1] * (k - len(hits)) for hits in results])
        recall = recall_at_k(found, truth[:, :k])
        if recall > best[1]:
            best = (params, recall)
        if recall >= tuning_target(target):
            break
    else:
        log.warning(
            "%s never reached recall %.3f (best %.3f at %s)",
            side,
            tuning_target(target),
            best[1],
            best[0],
        )
    log.info("%s side in %s: recall@10 %.3f with %s", side, collection, best[1], best[0])
    return {**measured, "search_params": best[0], "recall_at_10": round(best[1], 4)}
