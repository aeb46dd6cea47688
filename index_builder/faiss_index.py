"""FAISS indexes over unit vectors: factory choice, building from shards, recall and tuning.

Every index uses inner product (cosine, since bundles emit unit vectors). Vectors arrive as
a list of shards (arrays, usually memory-mapped `.npy` files), so no step needs the whole
gallery in memory: training uses a sample, adding and exact search stream shard by shard,
and IVF indexes can be built as one index per shard merged into on-disk inverted lists
(faiss `contrib/ondisk.py`). Recall is measured against exact search as faiss
`contrib/evaluation.py` (`knn_intersection_measure`) does.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# OpenMP threads that spin while they wait turn k-means into a crawl on a shared or
# CPU-limited host (PQ32 training, 2 threads on a busy machine: 49 s spinning, 2.7 s passive).
# It only takes effect if set before the OpenMP runtime starts, i.e. before faiss loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger(__name__)

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
MAX_TRAIN = 200_000
# A filtered search over a small subset (at most EXACT_ROWS rows and EXACT_FRACTION of the
# side) is exact: a gather of the subset's stored vectors and one matrix product. Larger ones
# search the index with a selector, its nprobe/efSearch widened by the fraction left out.
EXACT_ROWS = 1 << 16
EXACT_FRACTION = 0.1
MAX_EF = 4096
# Search parameters are tuned for recall@10 (build.py); deeper searches widen them (`search`).
TUNE_K = 10
# Indexes with compressed codes (scalar or product quantizers) rank approximately: their
# search returns RERANK x k candidates, re-scored exactly from the stored float vectors.
RERANK = {"SQ": 2, "PQ": 8}
# HNSW: efSearch may double up to this many times k before a short query is answered exactly.
WIDEN_LIMIT = 4
# Steps of about 1.4x: a tuned nprobe costs at most that much more than it needs (between 128
# and 256 lists, image queries of a realistic 1M caption index go from recall 0.948 to 0.973).
SEARCH_GRID = {
    "nprobe": (
        1,
        2,
        4,
        6,
        8,
        12,
        16,
        24,
        32,
        48,
        64,
        96,
        128,
        192,
        256,
        384,
        512,
        768,
        1024,
        1536,
        2048,
        3072,
        4096,
    ),  # fmt: skip
    "efSearch": (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024),
}
_FLAT = re.compile(r"^Flat$")
_HNSW = re.compile(r"^HNSW(\d+)(,Flat)?$")
_IVF = re.compile(r"^(?:OPQ(\d+)(?:_\d+)?,)?IVF(\d+),(Flat|SQ8|PQ(\d+)(?:x(\d+))?)$")


def make_index(factory: str, dim: int) -> Any:
    """An empty inner-product index; a factory string FAISS rejects is a ValueError."""
    try:
        index = faiss.index_factory(dim, factory, METRIC)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"FAISS rejects the factory string {factory!r} for d={dim}: {reason}"
        ) from None
    try:  # the factory turns on polysemous training for IVF-PQ: 50x slower, unused here
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if isinstance(ivf, faiss.IndexIVFPQ):
            ivf.do_polysemous_training = False  # type: ignore[attr-defined]
    except RuntimeError:
        pass
    return index


def estimate_bytes(factory: str, n: int, dim: int) -> int | None:
    """Approximate resident size of an index holding n vectors (None: unknown form)."""
    if _FLAT.match(factory):
        return n * dim * 4
    if m := _HNSW.match(factory):
        return n * (dim * 4 + int(m.group(1)) * 2 * 4 + 16)
    if m := _IVF.match(factory):
        nlist = int(m.group(2))
        codes = {"Flat": dim * 4, "SQ8": dim}
        code = codes.get(m.group(3)) or -(-int(m.group(4)) * int(m.group(5) or 8) // 8)
        opq = dim * dim * 4 if m.group(1) else 0
        return n * (code + 8) + nlist * dim * 4 + opq
    return None


def choose_factory(n: int, dim: int, memory_budget: int) -> str:
    """The FAISS guidelines, bounded by memory and by cross-modal recall: exact below 10k
    vectors, HNSW up to 50k, then IVF with 8-bit scalar-quantised codes, then IVF-PQ with the
    largest code that fits the budget (compressed codes are re-ranked exactly from the
    stored vectors, `default_rerank`).

    HNSW stops at 50k because queries from the other modality lie off the gallery's manifold:
    bench/index_bench.py measured HNSW32 recall@10 0.97 at 10k but 0.925 at 100k and 0.57 at 1M
    (efSearch 1024), where IVF-Flat reached 0.98 and 0.96 (docs/benchmarks.md). IVF-SQ8 with a
    re-rank of twice k reaches IVF-Flat's recall at every nprobe in a quarter of the memory and
    1/1.6 to 1/1.3 of the time (bench/realistic_index.py: a realistic 1M gallery, held-out real
    queries of the other modality)."""
    if n < 1:
        raise ValueError("cannot choose an index for an empty gallery")
    nlist = ivf_lists(n)
    candidates = ["Flat"] if n < 10_000 else []
    if n <= 50_000:
        candidates.append("HNSW32")
    candidates.append(f"IVF{nlist},SQ8")
    candidates += [
        f"IVF{nlist},PQ{m}" for m in (dim // 4, dim // 8, dim // 16) if m and dim % m == 0
    ]
    for factory in candidates:
        size = estimate_bytes(factory, n, dim)
        if size is not None and size <= memory_budget:
            return factory
    raise ValueError(
        f"no index type fits {n} vectors of dimension {dim} in a memory budget of "
        f"{memory_budget} bytes (smallest: {candidates[-1]})"
    )


def ivf_lists(n: int) -> int:
    """About 4 sqrt(n) lists (a power of two), with at least 39 training points per list."""
    target = 4 * math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(max(target, 1))))
    while nlist > 1 and n / nlist < 39:
        nlist //= 2
    return max(1, nlist)


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


def build_index(factory: str, shards: Sequence[np.ndarray], dim: int, use_gpu: bool = True) -> Any:
    """Train on a sample, then add the shards one at a time (on GPU when one is present)."""
    total = sum(len(s) for s in shards)
    if total == 0:
        raise ValueError("cannot build an index from an empty gallery")
    index = make_index(factory, dim)
    gpu = _gpu_resources() if use_gpu and "HNSW" not in factory else None
    if gpu is not None:
        index = faiss.index_cpu_to_gpu(gpu, 0, index)
    _train(index, factory, shards)
    for shard in shards:
        if len(shard):
            index.add(np.ascontiguousarray(shard, dtype=np.float32))
    return faiss.index_gpu_to_cpu(index) if gpu is not None else index


def build_ivf_on_disk(
    factory: str, shards: Sequence[np.ndarray], dim: int, out: Path, ivfdata: Path
) -> Any:
    """IVF index built one shard at a time and merged into on-disk inverted lists at `ivfdata`
    (the merge streams inverted lists; the codes never sit in memory together)."""
    if not _IVF.match(factory):
        raise ValueError(f"on-disk merging needs an IVF factory string, got {factory!r}")
    trained = make_index(factory, dim)
    _train(trained, factory, shards)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".shards-") as tmp:
        names, start = [], 0
        for i, shard in enumerate(shards):
            part = faiss.clone_index(trained)
            ids = np.arange(start, start + len(shard), dtype=np.int64)
            part.add_with_ids(np.ascontiguousarray(shard, dtype=np.float32), ids)
            start += len(shard)
            names.append(str(Path(tmp) / f"shard-{i:05d}.faiss"))
            faiss.write_index(part, names[-1])
            del part
        from faiss.contrib.ondisk import merge_ondisk

        merge_ondisk(trained, names, str(ivfdata))
    faiss.write_index(trained, str(out))
    return read_index(out)


def _train(index: Any, factory: str, shards: Sequence[np.ndarray]) -> None:
    if index.is_trained:
        return
    sample = sample_rows(shards, MAX_TRAIN)
    try:
        index.train(sample)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise ValueError(
            f"cannot train {factory!r} on {len(sample)} vectors (choose a smaller index): {reason}"
        ) from None


def _gpu_resources() -> Any:
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    return faiss.StandardGpuResources()


def is_on_disk(index: Any) -> bool:
    """Whether an IVF index keeps its inverted lists in an on-disk file."""
    try:
        invlists = faiss.extract_index_ivf(index).invlists
    except RuntimeError:
        return False
    return invlists is not None and isinstance(
        faiss.downcast_InvertedLists(invlists), faiss.OnDiskInvertedLists
    )


def write_index(index: Any, path: Path) -> None:
    faiss.write_index(index, str(path))


def read_index(path: Path, search_params: dict[str, int] | None = None) -> Any:
    """Load on CPU (on-disk inverted lists are found beside the file) and apply parameters."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"index file not found: {path}")
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not a readable FAISS index: {str(exc).strip()}") from None
    set_search_params(index, search_params or {})
    return index


def set_search_params(index: Any, params: dict[str, int]) -> None:
    """Apply FAISS search parameters (`rerank` is ours, applied at search time)."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        if name != "rerank":
            space.set_index_parameter(index, name, value)


def default_rerank(index: Any) -> int:
    """Candidates per result to re-score exactly: RERANK for compressed codes, else 1."""
    inner = faiss.downcast_index(_unwrapped(index))
    if isinstance(inner, faiss.IndexIVF | faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
    name = type(inner).__name__
    if "ScalarQuantizer" in name:
        return RERANK["SQ"]
    return RERANK["PQ"] if "PQ" in name else 1


def search(
    index: Any, queries: np.ndarray, k: int, candidates: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product, (scores, rows), every row filled when the index holds k vectors;
    with `candidates` (> k, for an exact re-rank), that many rows, searched as deep as for k.

    Parameters tuned for recall@10 do not reach deep pages: HNSW returns at most about efSearch
    rows, IVF only what its probed lists hold, and deeper ranks are found less reliably
    (issue 17: k=100, offset=900 came back with 64 hits). For this call only (per-call
    SearchParameters: the shared index and concurrent searches keep theirs), efSearch is raised
    to at least k and nprobe scaled by k / TUNE_K, up to nlist; queries still short search
    again with the parameter doubled, and an HNSW query still short at WIDEN_LIMIT x k is
    answered exactly from the graph's own vectors (its flat storage)."""
    param = tunable_param(index)
    n = max(k, candidates or k)
    if param is None:
        return index.search(queries, n)
    base = search_param(index, param)
    if param == "efSearch":
        value = max(base, k)
        limit = value * WIDEN_LIMIT
    else:
        limit = faiss.extract_index_ivf(index).nlist
        value = min(limit, max(base, -(-base * k // TUNE_K)))
    scores, rows = _search_with(index, queries, n, param, value)
    short = (rows < 0).any(axis=1)
    while short.any() and value < limit:
        value = min(limit, 2 * value)
        scores[short], rows[short] = _search_with(index, queries[short], n, param, value)
        short = (rows < 0).any(axis=1)
    if short.any():
        log.warning("%d queries short at efSearch %d: searching them exactly", short.sum(), value)
        storage = _hnsw(index).storage
        scores[short], rows[short] = storage.search(queries[short], n)
    return scores, rows


def rerank(
    stored: np.ndarray, queries: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k among candidate `rows` (Q, C; -1 for none) of compressed-code search:
    (scores, rows) from the stored float vectors (memory-mapped, so only the candidates'
    pages are read; faiss's IndexRefineFlat would hold a second float copy in memory)."""
    picked = np.asarray(stored[np.maximum(rows, 0).ravel()], dtype=np.float32)
    scores = np.einsum("qd,qcd->qc", queries, picked.reshape(*rows.shape, -1))
    scores[rows < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    return top, np.where(np.isfinite(top), np.take_along_axis(rows, order, axis=1), -1)


def _search_with(
    index: Any, queries: np.ndarray, k: int, param: str, value: int
) -> tuple[np.ndarray, np.ndarray]:
    # SearchParametersHNSW is missing from faiss's type stubs.
    hnsw = faiss.SearchParametersHNSW  # type: ignore[attr-defined]
    inner = hnsw() if param == "efSearch" else faiss.SearchParametersIVF()
    setattr(inner, param, value)
    params = inner
    if isinstance(index, faiss.IndexPreTransform):  # OPQ in front of the IVF index
        params = faiss.SearchParametersPreTransform()
        params.index_params = inner  # a raw pointer: `inner` lives until this call returns
    return index.search(queries, k, params=params)


def _unwrapped(index: Any) -> Any:
    return index.index if isinstance(index, faiss.IndexPreTransform) else index


def _hnsw(index: Any) -> Any:
    """The HNSW index itself: its graph (`hnsw`) and its vectors (`storage`)."""
    return faiss.downcast_index(_unwrapped(index))


def search_param(index: Any, param: str) -> int:
    """The index's own value of `param` (as `tunable_param` names it)."""
    if param == "nprobe":
        return int(faiss.extract_index_ivf(index).nprobe)
    return int(_hnsw(index).hnsw.efSearch)


def tunable_param(index: Any) -> str | None:
    """`nprobe` for IVF indexes, `efSearch` for HNSW, None for exact ones."""
    try:
        faiss.extract_index_ivf(index)
        return "nprobe"
    except RuntimeError:
        pass
    return "efSearch" if hasattr(_hnsw(index), "hnsw") else None


def exact_knn(queries: np.ndarray, shards: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Exact top-k rows by inner product, streamed over the shards (brute force)."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    start = 0
    for shard in shards:
        if len(shard):
            scores, rows = faiss.knn(
                queries, np.ascontiguousarray(shard, dtype=np.float32), min(k, len(shard)), METRIC
            )
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


def tune(
    index: Any,
    queries: np.ndarray,
    truth: np.ndarray,
    target: float,
    start: dict[str, int] | None = None,
    stored: np.ndarray | None = None,
) -> tuple[dict[str, int], float]:
    """Smallest nprobe/efSearch reaching `target` recall@k, else the best tried; with `start`
    (the setting before a small change), only settings from it upwards are tried. An index
    with compressed codes and `stored` vectors is measured as it serves: its candidates
    re-ranked exactly (`rerank` in the parameters, `default_rerank` deep).

    Returns the parameters (set on the index) and the recall they give."""
    k = truth.shape[1]
    k_search = min(k, index.ntotal)
    depth = default_rerank(index) if stored is not None else 1
    extra = {"rerank": depth} if depth > 1 else {}
    param = tunable_param(index)

    def measured() -> float:
        scores, rows = index.search(queries, k_search * depth)
        return recall_at_k(_refined(stored, queries, scores, rows, k_search)[1], truth)

    if param is None:
        return extra, measured()
    limit = faiss.extract_index_ivf(index).nlist if param == "nprobe" else 1 << 30
    grid = [v for v in SEARCH_GRID[param] if v <= limit and (param == "nprobe" or v >= k)]
    if param == "nprobe" and grid[-1] < limit <= 4096:
        grid.append(limit)
    floor = (start or {}).get(param, 0)
    grid = [v for v in grid if v >= floor] or grid[-1:]
    best: tuple[dict[str, int], float] = ({}, -1.0)
    for value in grid:
        set_search_params(index, {param: value})
        recall = measured()
        if recall > best[1]:
            best = ({param: value, **extra}, recall)
        if recall >= target:
            return {param: value, **extra}, recall
    log.warning("%s never reached recall %.3f (best %.3f at %s)", param, target, best[1], best[0])
    set_search_params(index, best[0])
    return best


def search_index(
    index: Any,
    stored: np.ndarray | None,
    queries: np.ndarray,
    k: int,
    mask: np.ndarray | None,
    rerank: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k among the rows where `mask` is True (all rows when None): (scores, rows), k capped
    at the allowed count, -1 where fewer are found.

    Without a mask this is `search` (widened for deep pages). Small allowed sets are searched
    exactly from the stored vectors; otherwise the index is searched with an ID selector and
    nprobe/efSearch divided by the allowed fraction, so the candidates a filter removes are
    made up for (and never fewer than k are looked at); queries still short are answered
    exactly when the vectors are stored. Exact (Flat) indexes always take the selector: it
    skips rows without copying any. With `rerank` > 1 and stored vectors, the index returns
    rerank x k candidates and the top k of them are re-scored exactly (`rerank`)."""
    per_hit = rerank if stored is not None else 1  # candidates per hit
    if mask is None:
        k = min(k, index.ntotal)
        scores, rows = search(index, queries, k, min(k * per_hit, index.ntotal))
        return _refined(stored, queries, scores, rows, k)
    allowed = np.flatnonzero(mask)
    k = min(k, len(allowed))
    if k == 0:
        empty = np.zeros((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    if stored is not None and exact_subset(len(allowed), len(mask), tunable_param(index)):
        return _exact_among(stored, allowed, queries, k)
    depth = min(k * per_hit, len(allowed))
    bits = np.packbits(mask, bitorder="little")
    selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
    params = _widened(index, depth, len(allowed) / index.ntotal, selector)
    scores, rows = index.search(queries, depth, params=params)
    scores, rows = _refined(stored, queries, scores, rows, k)
    short = (rows < 0).any(axis=1)
    if short.any() and stored is not None:
        scores[short], rows[short] = _exact_among(stored, allowed, queries[short], k)
    return scores, rows


def _refined(
    stored: np.ndarray | None, queries: np.ndarray, scores: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The top k of candidate lists, re-scored from `stored` when there are more than k."""
    if stored is None or rows.shape[1] <= k:
        return scores, rows
    return rerank(stored, queries, rows, k)


def _exact_among(
    stored: np.ndarray, allowed: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    subset = np.ascontiguousarray(stored[allowed], dtype=np.float32)
    scores, local = faiss.knn(queries, subset, k, METRIC)
    return scores, np.where(local >= 0, allowed[np.maximum(local, 0)], -1)


def exact_subset(allowed: int, total: int, param: str | None) -> bool:
    """Whether a filtered search over `allowed` of `total` rows gathers and scans them."""
    return param is not None and allowed <= min(EXACT_ROWS, EXACT_FRACTION * total)


def _widened(index: Any, k: int, fraction: float, selector: Any) -> Any:
    """Search parameters for a k-deep search over `fraction` of the rows, with `selector`."""
    param = tunable_param(index)
    if param is None:
        params = faiss.SearchParameters()
        params.sel = selector
        return params
    inner: Any
    if param == "nprobe":
        ivf = faiss.extract_index_ivf(index)
        per_list = max(1.0, fraction * ivf.ntotal / ivf.nlist)
        wanted = max(ivf.nprobe / fraction, 2 * k / per_list)
        value = int(min(ivf.nlist, math.ceil(wanted)))
        inner = faiss.SearchParametersIVF()
    else:
        value = int(max(k, min(MAX_EF, math.ceil(search_param(index, param) / fraction))))
        inner = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
    setattr(inner, param, value)
    inner.sel = selector
    if not isinstance(index, faiss.IndexPreTransform):
        return inner
    outer = faiss.SearchParametersPreTransform()  # OPQ in front of the IVF index
    outer.index_params = inner  # a raw pointer: `inner` lives until the search returns
    outer.sel = selector
    return outer
