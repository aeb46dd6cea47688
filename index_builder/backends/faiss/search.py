"""Searching a FAISS index: deep pages, filtered searches (a selector, or exact over a small
subset), exact re-ranking of compressed codes, and tuning nprobe/efSearch to a recall target."""

from __future__ import annotations

import logging
import math
import mmap
import os
import weakref
from typing import Any

import faiss
import numpy as np

from index_builder.backends.faiss.faiss_index import (
    TUNE_K,
    default_rerank,
    hnsw_index,
    search_param,
    set_search_params,
    tunable_param,
)
from index_builder.backends.recall import METRIC, recall_at_k, tuning_target

log = logging.getLogger(__name__)
# A filtered search over a small subset (at most EXACT_ROWS rows and EXACT_FRACTION of the
# side) is exact: a gather of the subset's stored vectors and one matrix product. Larger ones
# search the index with a selector, its nprobe/efSearch widened by the fraction left out.
EXACT_ROWS = 1 << 16
EXACT_FRACTION = 0.1
MAX_EF = 4096
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
        storage = hnsw_index(index).storage
        scores[short], rows[short] = storage.search(queries[short], n)
    return scores, rows


def rerank(
    stored: np.ndarray, queries: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k among candidate `rows` (Q, C; -1 for none) of compressed-code search:
    (scores, rows) from the stored float vectors (only the candidates' rows are read,
    `gathered`; faiss's IndexRefineFlat would hold a second float copy in memory)."""
    picked = gathered(stored, np.maximum(rows, 0).ravel())
    scores = np.einsum("qd,qcd->qc", queries, picked.reshape(*rows.shape, -1))
    scores[rows < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    return top, np.where(np.isfinite(top), np.take_along_axis(rows, order, axis=1), -1)


# Open descriptors of the files whose vectors a loaded version re-ranks (`pinned`), by the id of
# their memory map, closed when the map is collected.
_PINNED: dict[int, int] = {}


def _file_map(stored: np.ndarray) -> np.memmap | None:
    """The memory map of a whole `.npy` file under `stored` (a view's root), or None."""
    mapping = stored
    while isinstance(mapping.base, np.ndarray):
        mapping = mapping.base
    if isinstance(mapping, np.memmap) and isinstance(mapping.base, mmap.mmap):
        return mapping if mapping.filename is not None else None
    return None


def pinned(stored: np.ndarray) -> np.ndarray:
    """`stored` (a memory-mapped `.npy`), its file held open as long as the map lives: `gathered`
    reads a version's vectors through this descriptor, so a version pruned (its directory
    removed) while a reader still holds it stays readable, as its memory map does."""
    mapping = _file_map(stored)
    if mapping is not None and id(mapping) not in _PINNED:
        fd = os.open(str(mapping.filename), os.O_RDONLY)
        _PINNED[id(mapping)] = fd
        weakref.finalize(mapping, _unpin, id(mapping), fd)
    return stored


def _unpin(key: int, fd: int) -> None:
    _PINNED.pop(key, None)
    os.close(fd)


def gathered(stored: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 copies of `rows` of `stored`. Contiguous float32 rows of a memory-mapped file
    (as `np.load(mmap_mode="r")` opens a `.npy`, or a slice of rows of one) are read with
    `os.preadv`, one row a call: the rows come through the page cache without being mapped
    into the process, so the vectors a service re-ranks never add to its resident memory (a
    mapped page stays resident until the kernel reclaims it: 0.38x of the raw vectors at 10M
    items per side), and the reads of rows not in the page cache are all started before the
    first is awaited (POSIX_FADV_WILLNEED), not one page fault and its read-around after
    another (bench/layout_at_scale.py). Other arrays, and a changed side's segments
    (`segments.SegmentedVectors`, which gathers each of its parts here), are indexed."""
    if not isinstance(stored, np.ndarray):
        return np.asarray(stored[rows], dtype=np.float32)
    mapping = _file_map(stored)  # the whole file's map (a view's own offset is its root's)
    if not (
        mapping is not None
        and stored.dtype == np.float32
        and stored.flags.c_contiguous
        and stored.ndim == 2
    ):
        return np.asarray(stored[rows], dtype=np.float32)
    start = mapping.offset + stored.ctypes.data - mapping.ctypes.data
    out = np.empty((len(rows), stored.shape[1]), np.float32)
    width = stored.shape[1] * 4
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(stored)):
        raise IndexError(f"rows outside 0..{len(stored) - 1} of the stored vectors")
    offsets = [start + row * width for row in rows.tolist()]
    held = _PINNED.get(id(mapping))
    fd = held if held is not None else os.open(str(mapping.filename), os.O_RDONLY)
    try:
        for offset in offsets:  # every read asked for at once: from disk, they overlap
            os.posix_fadvise(fd, offset, width, os.POSIX_FADV_WILLNEED)
        for i, offset in enumerate(offsets):
            if os.preadv(fd, [out[i]], offset) != width:
                raise OSError(f"short read at byte {offset} of {mapping.filename}")
    finally:
        if held is None:
            os.close(fd)
    return out


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


def tune(
    index: Any,
    queries: np.ndarray,
    truth: np.ndarray,
    target: float,
    start: dict[str, int] | None = None,
    stored: np.ndarray | None = None,
    margin: float = 0.0,
) -> tuple[dict[str, int], float]:
    """Smallest nprobe/efSearch reaching `target` recall@k, raised by `margin` (`tuning_target`;
    a build tunes with TUNE_MARGIN), else the best tried; with `start` (the setting before a
    small change), only settings from it upwards are tried. An index with compressed codes
    and `stored` vectors is measured as it serves: its candidates re-ranked exactly (`rerank`
    in the parameters, `default_rerank` deep).

    Returns the parameters (set on the index) and the recall they give."""
    target = tuning_target(target, margin)
    k = truth.shape[1]
    k_search = min(k, index.ntotal)
    depth = default_rerank(index) if stored is not None else 1
    extra = {"rerank": depth} if depth > 1 else {}
    param = tunable_param(index)

    def measured() -> float:  # as served: queries short of candidates search wider
        scores, rows = search(index, queries, k_search, k_search * depth)
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
