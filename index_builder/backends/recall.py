"""Recall against exact search, as every backend measures its index: query samples, the exact
top-k (faiss's brute-force kernels) and recall@k, as faiss `contrib/evaluation.py`
(`knn_intersection_measure`) does. Loads faiss with this project's process settings."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

# OpenMP threads that spin while they wait turn k-means into a crawl on a shared or
# CPU-limited host (PQ32 training, 2 threads on a busy machine: 49 s spinning, 2.7 s passive).
# It only takes effect if set before the OpenMP runtime starts, i.e. before faiss loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

METRIC = faiss.METRIC_INNER_PRODUCT
# Exact distances (flat indexes, IVF coarse quantizers, k-means) go through BLAS when queries x
# dimension reaches this, else through the SIMD loop. This faiss build defaults to 128000,
# which sends k-means (thousands of points against a few hundred centroids) down the SIMD loop:
# 7x slower for IVF training and minutes instead of seconds for PQ codebooks. BLAS costs more
# for one or two queries (one thread, d=256: 0.26 against 0.05 ms to probe 4096 centroids,
# 7.0 against 3.7 ms over 100k vectors) and wins from four (bench/blas_threshold.py), so at
# d=256 the switch comes at 4 queries.
BLAS_THRESHOLD = 4 * 256
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def sample_rows(shards: Sequence[np.ndarray], count: int, seed: int = 0) -> np.ndarray:
    """`count` rows drawn uniformly without replacement across the shards (all if fewer)."""
    sizes = np.array([len(s) for s in shards])
    total = int(sizes.sum())
    picks = np.sort(np.random.default_rng(seed).choice(total, min(count, total), replace=False))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for i, shard in enumerate(shards):
        local = picks[(picks >= offsets[i]) & (picks < offsets[i + 1])] - offsets[i]
        if len(local):
            parts.append(np.asarray(shard[local], dtype=np.float32))
    return np.ascontiguousarray(np.concatenate(parts))


KNN_BLOCK = 262_144  # rows read into memory at a time from a (memory-mapped) shard


def blocks(shards: Sequence[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The shards' rows in order, as contiguous float32 blocks of at most `size` rows: a
    memory-mapped shard larger than memory is read a block at a time."""
    for shard in shards:
        for start in range(0, len(shard), size):
            yield np.ascontiguousarray(shard[start : start + size], dtype=np.float32)


def exact_knn(queries: np.ndarray, shards: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Exact top-k rows by inner product, streamed over the shards (brute force)."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    start = 0
    for shard in blocks(shards, KNN_BLOCK):
        scores, rows = faiss.knn(queries, shard, min(k, len(shard)), METRIC)
        pad = k - rows.shape[1]
        if pad:
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1 - start)
        heap.add_result(scores, rows + start)
        start += len(shard)
    heap.finalize()
    return heap.I


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k that the index returns (knn intersection)."""
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(f[:k], t[t >= 0])) for f, t in zip(found, truth, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


# Tuning (both backends) aims above the target by this fraction of the misses it allows
# (0.95 -> 0.97): the tuning queries, the other side's gallery vectors, each have their pair
# in the gallery and are easier than a real query, which has none (bench/scale_curve.py: tuned
# 0.952, served 0.935 to held-out real image queries over 10M captions;
# bench/layout_at_scale.py: over 1M captions tuned 0.957 at nprobe 96, served 0.937; with the
# margin 0.978 at 192, served 0.964).
TUNE_MARGIN = 0.4


def tuning_target(target: float, margin: float = TUNE_MARGIN) -> float:
    """The recall tuning aims at to serve `target` to real queries."""
    return 1 - (1 - target) * (1 - margin)
