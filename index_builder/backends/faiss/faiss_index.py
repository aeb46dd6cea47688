"""FAISS indexes over unit vectors: factory choice, building from shards, reading, writing
and search parameters (searching and tuning them: `search`).

Every index uses inner product (cosine, since bundles emit unit vectors). Vectors arrive as
a list of shards (arrays, usually memory-mapped `.npy` files), so no step needs the whole
gallery in memory: training uses a sample, adding and exact search stream shard by shard,
and IVF indexes can be built as one index per shard merged into on-disk inverted lists
(faiss `contrib/ondisk.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Before faiss loads: passive OpenMP waits (the reason is in `index_builder.backends.recall`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from index_builder.backends.base import ivf_lists  # noqa: E402
from index_builder.backends.recall import METRIC, blocks, sample_rows  # noqa: E402

log = logging.getLogger(__name__)

MAX_TRAIN = 200_000
PART = 1 << 20  # vectors per resumable part of a large IVF build
ADD_BLOCK = 262_144  # vectors read and added at a time (shards may be larger than memory)
# Search parameters are tuned for recall@10 (`write.index_side`); deeper searches widen them
# (`search.search`).
TUNE_K = 10
# Indexes with compressed codes (scalar or product quantizers) rank approximately: their
# search returns RERANK x k candidates, re-scored exactly from the stored float vectors.
# 4-bit fast-scan codes need 16 x k: at 10M items 8 x k held real queries' recall@10 at
# 0.965-0.968 whatever the nprobe, 16 x k reached 0.978 (bench/notes/scale_curve.md).
RERANK = {"SQ": 2, "PQ": 8, "FastScan": 16}
_FLAT = re.compile(r"^Flat$")
_HNSW = re.compile(r"^HNSW(\d+)(,Flat)?$")
_IVF = re.compile(
    r"^(?:OPQ(\d+)(?:_\d+)?,)?IVF(\d+)(?:_HNSW(\d+))?,(Flat|SQ8|PQ(\d+)(?:x(\d+)(?:fs)?)?)$"
)
# Vectors added through an HNSW coarse quantizer are assigned to a list searching this deep:
# faiss's default, which builds add with; changes too (`for_adding`). Adding 3000 vectors over
# 1024 lists took 0.55 s at 16 and 13.1 s at the nprobe of searches, 1024; 16 agreed with the
# exact nearest centroid for 85% of random vectors (64: 99.8%), and a vector filed in a
# neighbouring list is still found where searches probe that list.
ADD_EF_SEARCH = 16
# From this many inverted lists the coarse quantizer is an HNSW graph over the centroids, in
# training (k-means assignment) and adding as in search: over 16384 lists a flat quantizer
# trained 100k vectors in 483 s and added 5,900 vectors a second here, HNSW32 in 102 s and
# 31,000 a second, at the same recall per nprobe (docs/benchmarks.md, "Ten million").
HNSW_LISTS = 8192


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
        nlist, graph = int(m.group(2)), int(m.group(3) or 0) * 2 * 4
        codes = {"Flat": dim * 4, "SQ8": dim}
        code = codes.get(m.group(4)) or -(-int(m.group(5)) * int(m.group(6) or 8) // 8)
        opq = dim * dim * 4 if m.group(1) else 0
        return n * (code + 8) + nlist * (dim * 4 + graph) + opq
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
    queries of the other modality). From HNSW_LISTS lists (about 4M vectors) the codes are
    4-bit, one per dimension, scanned with SIMD (PQ fast scan) and re-ranked from 16 x k
    candidates: at 10M items they served the same recall as SQ8 in half the memory and half
    the time a query in batches, where scanning SQ8 codes is bound by memory bandwidth
    (bench/notes/scale_curve.md)."""
    if n < 1:
        raise ValueError("cannot choose an index for an empty gallery")
    nlist = ivf_lists(n)
    ivf = f"IVF{nlist}_HNSW32" if nlist >= HNSW_LISTS else f"IVF{nlist}"
    candidates = ["Flat"] if n < 10_000 else []
    if n <= 50_000:
        candidates.append("HNSW32")
    fast_scan = nlist >= HNSW_LISTS and dim % 2 == 0
    candidates.append(f"{ivf},PQ{dim}x4fs" if fast_scan else f"{ivf},SQ8")
    candidates += [f"{ivf},PQ{m}" for m in (dim // 4, dim // 8, dim // 16) if m and dim % m == 0]
    for factory in candidates:
        size = estimate_bytes(factory, n, dim)
        if size is not None and size <= memory_budget:
            return factory
    raise ValueError(
        f"no index type fits {n} vectors of dimension {dim} in a memory budget of "
        f"{memory_budget} bytes (smallest: {candidates[-1]})"
    )


def explain_choice(factory: str, n: int, dim: int, memory_budget: int) -> str:
    """Why `choose_factory` picks `factory` for n vectors, in one sentence (the build logs it
    and records it in index.json)."""
    if factory == "Flat":
        return f"{n:,} vectors: exact search (below 10,000)"
    if factory.startswith("HNSW"):
        return f"{n:,} vectors: an HNSW graph (up to 50,000; beyond, cross-modal recall falls)"
    if factory.endswith("SQ8"):
        codes = "8-bit scalar codes"
    elif factory.endswith("fs"):
        codes = (
            "4-bit codes scanned with SIMD (PQ fast scan: half the bytes of 8-bit scalar codes "
            "a query scans, the cost that grows with the collection; 16 x k re-ranked)"
        )
    else:
        codes = "product-quantised codes (8-bit scalar codes would exceed the budget)"
    size = (estimate_bytes(factory, n, dim) or 0) / 2**30
    quantizer = (
        f", found through an HNSW graph over the centroids (from {HNSW_LISTS} lists)"
        if "_HNSW" in factory
        else ""
    )
    return (
        f"{n:,} vectors: {ivf_lists(n)} inverted lists (about 4 sqrt(n)){quantizer} of {codes}, "
        f"{size:.2f} GiB in memory within the {memory_budget / 2**30:.2f} GiB budget; the "
        "float vectors stay on disk, read with pread for the exact re-rank (through the page "
        "cache, never mapped into the service), and nprobe is tuned to the target recall with "
        "a margin"
    )


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
    added, started = 0, time.perf_counter()
    for block in blocks(shards, ADD_BLOCK):
        index.add(block)
        added += len(block)
        if total > ADD_BLOCK:
            rate = added / max(time.perf_counter() - started, 1e-9)
            log.info("added %d of %d vectors (%.0f a second)", added, total, rate)
    return faiss.index_gpu_to_cpu(index) if gpu is not None else index


def build_resumable(factory: str, shards: Sequence[np.ndarray], dim: int, work: Path) -> Any:
    """An IVF index trained once, then filled in parts of PART vectors, each written under
    `work` before the next starts: a build killed part-way and run again on the same gallery
    (`work` is named for it, `resume_key`) keeps the trained index and the parts written,
    and only adds the rest. The parts are merged into one in-memory index at the end."""
    work.mkdir(parents=True, exist_ok=True)
    trained_file = work / "trained.faiss"
    if trained_file.is_file():
        trained = read_index(trained_file)
        log.info("resuming %s: trained index found in %s", factory, work)
    else:
        trained = make_index(factory, dim)
        _train(trained, factory, shards)
        _write_atomically(trained, trained_file)
    total = sum(len(s) for s in shards)
    index = faiss.clone_index(trained)
    for number, start in enumerate(range(0, total, PART)):
        file = work / f"part-{number:05d}.faiss"
        stop = min(total, start + PART)
        if not file.is_file():
            part = faiss.clone_index(trained)
            for block in blocks(rows_between(shards, start, stop), ADD_BLOCK):
                part.add(block)
            _write_atomically(part, file)
            log.info("added %d of %d vectors (part %d written)", stop, total, number)
        else:
            log.info("added %d of %d vectors (part %d resumed)", stop, total, number)
        index.merge_from(read_index(file), start)
    return index


def resume_key(factory: str, shards: Sequence[np.ndarray]) -> str:
    """Names a build: its factory, size, and a digest of rows sampled across the gallery."""
    total = sum(len(s) for s in shards)
    sample = sample_rows(shards, 64, seed=2) if total else np.zeros(0, np.float32)
    digest = hashlib.sha1(f"{factory}|{total}".encode() + sample.tobytes()).hexdigest()
    return digest[:16]


def rows_between(shards: Sequence[np.ndarray], start: int, stop: int) -> list[np.ndarray]:
    """Rows start..stop of the shards taken together, as views of the shards."""
    out, offset = [], 0
    for shard in shards:
        low, high = max(start - offset, 0), min(stop - offset, len(shard))
        if low < high:
            out.append(shard[low:high])
        offset += len(shard)
    return out


def _write_atomically(index: Any, path: Path) -> None:
    temp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(temp))
    os.replace(temp, path)


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
    log.info("training %s on %d sampled vectors", factory, len(sample))
    # An HNSW coarse quantizer assigns with a graph in k-means too (the graph object must
    # outlive the training: FAISS holds a bare pointer to it).
    ivf = faiss.extract_index_ivf(index) if "_HNSW" in factory else None
    graph = faiss.IndexHNSWFlat(index.d, 32, METRIC)
    if ivf is not None:
        ivf.clustering_index = graph
    try:
        index.train(sample)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise ValueError(
            f"cannot train {factory!r} on {len(sample)} vectors (choose a smaller index): {reason}"
        ) from None
    finally:
        if ivf is not None:
            ivf.clustering_index = None  # type: ignore[assignment]  # NULL: use the quantizer


def resumable(factory: str, n: int, use_gpu: bool) -> bool:
    """Whether a build of n vectors goes in resumable parts (`build_resumable`): IVF indexes
    of more than one part, built on the CPU."""
    gpu = use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    return bool(_IVF.match(factory)) and n > PART and not gpu


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


def split_lists(index: Any) -> None:
    """Let a search split each query's inverted lists across the OpenMP threads its caller
    allows: a lone query is answered by all of them; a batch searched on one thread, as a
    service searches its batches, runs as before. IVF (faiss parallel_mode 1, same results):
    1.8x faster on 2 threads at nprobe 96 to 384 over 1M items. PQ fast scan (implementation
    15, over (query, list) pairs): 1.9x, at the cost of candidates differing at the edge of
    the 16 x k re-ranked (0.4% of them), and the same time a query in batches of 8."""
    with contextlib.suppress(RuntimeError):  # not an IVF index: nothing to split
        ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.parallel_mode = 1
        if isinstance(ivf, faiss.IndexIVFFastScan):
            ivf.implem = 15


def set_search_params(index: Any, params: dict[str, int]) -> None:
    """Apply FAISS search parameters (`rerank` is ours, applied at search time)."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        if name != "rerank":
            space.set_index_parameter(index, name, value)
    if "nprobe" in params:
        _deepen_quantizer(index, params["nprobe"])


def for_adding(index: Any) -> Any:
    """`index` (an emptied copy of a loaded one, about to be filled by a change) with its HNSW
    coarse quantizer assigning as a build's does (efSearch ADD_EF_SEARCH), not as deep as
    searches probe: a loaded index's quantizer searches nprobe deep (`_deepen_quantizer`),
    and assigning at that depth made a change's adds 24x slower."""
    with contextlib.suppress(RuntimeError):  # not an IVF index
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = ADD_EF_SEARCH
    return index


def _deepen_quantizer(index: Any, nprobe: int) -> None:
    """An HNSW coarse quantizer returns nprobe good lists only when it searches at least that
    deep (efSearch 16, its default, held recall@10 at 0.6 over 10M whatever the nprobe)."""
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(16, nprobe)


def default_rerank(index: Any) -> int:
    """Candidates per result to re-score exactly: RERANK for compressed codes, else 1."""
    inner = faiss.downcast_index(_unwrapped(index))
    if isinstance(inner, faiss.IndexIVF | faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
    name = type(inner).__name__
    if "ScalarQuantizer" in name:
        return RERANK["SQ"]
    if "FastScan" in name:
        return RERANK["FastScan"]
    return RERANK["PQ"] if "PQ" in name else 1


def _unwrapped(index: Any) -> Any:
    return index.index if isinstance(index, faiss.IndexPreTransform) else index


def hnsw_index(index: Any) -> Any:
    """The HNSW index itself: its graph (`hnsw`) and its vectors (`storage`)."""
    return faiss.downcast_index(_unwrapped(index))


def search_param(index: Any, param: str) -> int:
    """The index's own value of `param` (as `tunable_param` names it)."""
    if param == "nprobe":
        return int(faiss.extract_index_ivf(index).nprobe)
    return int(hnsw_index(index).hnsw.efSearch)


def tunable_param(index: Any) -> str | None:
    """`nprobe` for IVF indexes, `efSearch` for HNSW, None for exact ones."""
    try:
        faiss.extract_index_ivf(index)
        return "nprobe"
    except RuntimeError:
        pass
    return "efSearch" if hasattr(hnsw_index(index), "hnsw") else None
