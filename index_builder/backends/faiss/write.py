"""Writing a FAISS version into a staging directory: a new one from rows and vectors (each
side built, saved and tuned), or a change of the current one.

A change copies the current version's indexes, appends the new vectors (no retraining: IVF
lists keep their centroids) and tombstones deleted or replaced rows, so it costs the new
items' embedding plus writing the version, not a rebuild. Row numbers stay stable; searches
skip tombstoned rows. When more than `COMPACT_AT` of a side's rows are tombstones, the side is
compacted: rebuilt from its stored vectors into a copy of the trained index.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index_builder.atomic import atomic_write_json, write_jsonl
from index_builder.backends.base import (
    EMPTIED,
    META_FILES,
    OTHER,
    RECALL_QUERIES,
    SIDES,
    IndexOptions,
    Plan,
    check_gallery,
    info_record,
)
from index_builder.backends.faiss import faiss_index
from index_builder.backends.faiss.rows import JsonlRows, write_rows
from index_builder.backends.faiss.search import tune
from index_builder.backends.faiss.version import (
    DELETED_FILES,
    INDEX_FILES,
    INDEX_JSON,
    VECTOR_FILES,
    LoadedIndex,
)
from index_builder.backends.recall import TUNE_MARGIN, blocks, exact_knn, sample_rows
from index_builder.filters import field_types

log = logging.getLogger(__name__)
K = faiss_index.TUNE_K  # search parameters are tuned for recall@K
Shards = Sequence[np.ndarray]


def index_side(
    side: str,
    shards: Shards,
    query_shards: Shards | None,
    dim: int,
    options: IndexOptions,
    out: Path,
    resume: Path | None = None,
) -> dict[str, Any]:
    """Build, save and tune one side, and store its vectors beside the index; recall is
    measured with the other side's vectors as queries (captions against the image index,
    images against the caption index), or with the side's own when it stands alone. Large
    IVF builds keep their progress under `resume` (`faiss_index.build_resumable`)."""
    count = sum(len(s) for s in shards)
    if count == 0:
        raise ValueError(f"cannot index an empty gallery ({side} side has no vectors)")
    factory = options.factory or faiss_index.choose_factory(count, dim, options.memory_budget)
    choice = (
        "asked for (--factory)"
        if options.factory
        else faiss_index.explain_choice(factory, count, dim, options.memory_budget)
    )
    log.info("%s index %s: %s", side, factory, choice)
    started = time.perf_counter()
    file = out / INDEX_FILES[side]
    index = _build(side, factory, shards, dim, options, file, resume)
    write_vectors(out / VECTOR_FILES[side], shards, dim)
    seconds = time.perf_counter() - started
    query_side = OTHER[side] if query_shards else side
    queries = sample_rows(query_shards or shards, options.queries, seed=1)
    truth = exact_knn(queries, shards, min(K, count))
    stored = np.load(out / VECTOR_FILES[side], mmap_mode="r")
    params, recall = tune(
        index, queries, truth, options.target_recall, stored=stored, margin=TUNE_MARGIN
    )
    log.info(
        "%s index %s: %d vectors, recall@10 %.3f with %s", side, factory, count, recall, params
    )
    return {
        "factory": factory,
        "choice": choice,
        "count": count,
        "rows": count,
        "deleted": 0,
        "file": file.name,
        "meta": META_FILES[side],
        "vectors": VECTOR_FILES[side],
        "search_params": params,
        "recall_at_10": round(recall, 4),
        "target_recall": options.target_recall,
        "queries": len(queries),
        "query_side": query_side,
        "bytes": sum(p.stat().st_size for p in out.glob(f"{side}.*") if p.suffix == ".faiss"),
        "build_seconds": round(seconds, 3),
    }


def _build(
    side: str,
    factory: str,
    shards: Shards,
    dim: int,
    options: IndexOptions,
    file: Path,
    resume: Path | None,
) -> Any:
    """Build one side's index and write it to `file`: with on-disk inverted lists, in
    resumable parts under `resume` when large, else in memory."""
    count = sum(len(s) for s in shards)
    if options.on_disk:
        return faiss_index.build_ivf_on_disk(
            factory, shards, dim, file, file.with_suffix(".ivfdata")
        )
    if resume is not None and faiss_index.resumable(factory, count, options.use_gpu):
        work = resume / f"{side}-{faiss_index.resume_key(factory, shards)}"
        for stale in resume.glob(f"{side}-*"):  # another gallery's: never resumed
            if stale != work:
                shutil.rmtree(stale, ignore_errors=True)
        index = faiss_index.build_resumable(factory, shards, dim, work)
        faiss_index.write_index(index, file)
        shutil.rmtree(work, ignore_errors=True)
        return index
    index = faiss_index.build_index(factory, shards, dim, options.use_gpu)
    faiss_index.write_index(index, file)
    return index


def write_vectors(path: Path, shards: Shards, dim: int) -> None:
    """The shards as one row-aligned float32 `.npy` file, written shard by shard."""
    total = sum(len(s) for s in shards)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(total, dim))
    start = 0
    for block in blocks(shards, _CHUNK):
        out[start : start + len(block)] = block
        start += len(block)
    out.flush()
    del out


def write_version(
    staging: Path,
    *,
    bundle_id: str,
    dim: int,
    shards: Mapping[str, Shards],
    rows: Mapping[str, list[dict[str, Any]]],
    options: IndexOptions,
    dataset: dict[str, Any],
    bundle_path: str | Path | None,
    skipped: dict[str, dict[str, Any]],
    resume: Path | None = None,
) -> None:
    """A new version in `staging`: each side that has rows built, tuned and described (large
    builds resumable from `resume`)."""
    present = check_gallery(shards, rows)
    sides = {}
    for side in present:
        write_jsonl(staging / META_FILES[side], rows[side])
        other = shards[OTHER[side]] if OTHER[side] in present else None
        sides[side] = index_side(side, shards[side], other, dim, options, staging, resume)
        sides[side]["fields"] = field_types(row.get("meta") or {} for row in rows[side])
        sides[side]["skipped"] = skipped.get(side, {"count": 0, "examples": []})
    write_info(staging, bundle_id, bundle_path, dim, dataset, None, sides)


def write_info(
    staging: Path,
    bundle_id: str,
    bundle_path: str | Path | None,
    dim: int,
    dataset: dict[str, Any],
    parent: str | None,
    sides: dict[str, Any],
) -> None:
    info = info_record(staging.name, bundle_id, bundle_path, dim, dataset, parent, sides)
    atomic_write_json(staging / INDEX_JSON, info)


COMPACT_AT = 0.2
_CHUNK = 65536


def write_change(
    staging: Path,
    current: LoadedIndex,
    plan: Plan,
    dataset: dict[str, Any],
    bundle_path: str | Path | None,
) -> None:
    """A changed version in `staging`: changed sides append vectors and tombstone rows,
    unchanged sides are copies."""
    rows, vectors, gone = plan.rows, plan.vectors, plan.gone
    sides = {}
    for side in SIDES:
        if current.has(side) and not rows[side] and not gone[side]:
            sides[side] = _copy_side(current, side, staging)
        elif current.has(side):
            sides[side] = _change_side(
                current, side, rows[side], vectors.get(side), gone[side], staging
            )
        elif rows[side]:
            other = _other_vectors(current, OTHER[side], vectors)
            sides[side] = index_side(
                side, [vectors[side]], other, current.embed_dim, IndexOptions(), staging
            )
            write_jsonl(staging / META_FILES[side], rows[side])
            sides[side]["fields"] = field_types(r.get("meta") or {} for r in rows[side])
            sides[side]["skipped"] = {"count": 0, "reasons": {}, "examples": []}
    if not any(info["count"] for info in sides.values()):
        raise ValueError(EMPTIED)
    for side, info in sides.items():
        if (rows[side] or gone[side]) and info["count"]:
            info.update(_measure(staging, sides, side))
    dim, parent = current.embed_dim, current.version
    write_info(staging, current.bundle_id, bundle_path, dim, dataset, parent, sides)


def _change_side(
    current: LoadedIndex,
    side: str,
    new_rows: list[dict[str, Any]],
    new_vectors: np.ndarray | None,
    gone: set[int],
    staging: Path,
) -> dict[str, Any]:
    """Write one side of the new version: the old rows and vectors plus the new, tombstones
    updated; compacted when tombstones pass `COMPACT_AT`."""
    index = current.indexes[side]
    if faiss_index.is_on_disk(index):
        raise ValueError("an on-disk index cannot be changed in place; run `cots index rebuild`")
    old = current.vectors.get(side)
    old = old if old is not None else index.reconstruct_n(0, index.ntotal)
    added = new_vectors if new_vectors is not None else np.zeros((0, old.shape[1]), np.float32)
    deleted = np.zeros(len(old) + len(new_rows), dtype=bool)
    if current.deleted.get(side) is not None:
        deleted[: len(old)] = current.deleted[side]
    deleted[list(gone)] = True
    kept = np.ones(len(deleted), dtype=bool)  # the rows the new version holds
    started = time.perf_counter()
    updated = faiss.clone_index(index)
    if deleted.mean() > COMPACT_AT:
        kept = ~deleted
        vectors = np.concatenate([np.asarray(old)[kept[: len(old)]], added[kept[len(old) :]]])
        updated.reset()
        deleted = np.zeros(len(vectors), dtype=bool)
        _add(updated, vectors)
        np.save(staging / VECTOR_FILES[side], vectors)
    else:
        _add(updated, added)
        _append_vectors(staging / VECTOR_FILES[side], old, added)
    faiss_index.write_index(updated, staging / INDEX_FILES[side])
    new = [row for row, keep in zip(new_rows, kept[len(old) :], strict=True) if keep]
    write_rows(
        staging / META_FILES[side], current.row_files[side], np.flatnonzero(kept[: len(old)]), new
    )
    info = {**current.info["sides"][side]}
    info.pop("deleted_file", None)
    if deleted.any():
        np.save(staging / DELETED_FILES[side], np.flatnonzero(deleted))
        info["deleted_file"] = DELETED_FILES[side]
    rows = JsonlRows(staging / META_FILES[side])  # the written rows, read back
    live = (row.get("meta") or {} for row, dead in zip(rows, deleted, strict=True) if not dead)
    info.update(
        count=int((~deleted).sum()),
        rows=len(rows),
        deleted=int(deleted.sum()),
        vectors=VECTOR_FILES[side],
        fields=field_types(live),
        bytes=(staging / INDEX_FILES[side]).stat().st_size,
        build_seconds=round(time.perf_counter() - started, 3),
    )
    return info


def _copy_side(current: LoadedIndex, side: str, staging: Path) -> dict[str, Any]:
    """An unchanged side: the current version's files, copied (a reflink where the file
    system shares blocks copy-on-write). Never hard links: a file damaged in one version
    would be damaged in its rollback target too (issue 25)."""
    info = current.info["sides"][side]
    for key in ("file", "meta", "vectors", "deleted_file"):
        if info.get(key):
            copy_file(current.path / info[key], staging / info[key])
    return {**info}


_FICLONE = 0x40049409  # linux/fs.h: share the source's blocks, copy-on-write


def copy_file(source: Path, target: Path) -> None:
    """`source` to a new file `target`: a reflink (btrfs, XFS) when the file system has
    them, else a plain copy."""

    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            return
        except OSError:
            pass
        shutil.copyfileobj(src, dst, 1 << 20)


def _add(index: Any, vectors: np.ndarray) -> None:
    for start in range(0, len(vectors), _CHUNK):
        index.add(np.ascontiguousarray(vectors[start : start + _CHUNK], dtype=np.float32))


def _append_vectors(path: Path, old: np.ndarray, added: np.ndarray) -> None:
    out = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.float32, shape=(len(old) + len(added), old.shape[1])
    )
    for start in range(0, len(old), _CHUNK):
        end = min(start + _CHUNK, len(old))
        out[start:end] = old[start:end]
    out[len(old) :] = added
    out.flush()
    del out


def _other_vectors(current: LoadedIndex, side: str, vectors: dict[str, np.ndarray]) -> list | None:
    if current.has(side):
        stored = current.vectors.get(side)
        return [stored] if stored is not None else None
    return [vectors[side]] if side in vectors else None


def _measure(staging: Path, sides: dict[str, Any], side: str) -> dict[str, Any]:
    """Recall@10 of the changed index against exact search, re-tuned, with the other side's
    (or its own) stored vectors as queries."""
    index = faiss_index.read_index(staging / INDEX_FILES[side], sides[side]["search_params"])
    base = np.load(staging / VECTOR_FILES[side], mmap_mode="r")
    query_side = OTHER[side] if OTHER[side] in sides else side
    source = np.load(staging / VECTOR_FILES[query_side], mmap_mode="r")
    queries = sample_rows([source], RECALL_QUERIES, seed=1)
    truth = exact_knn(queries, [base], min(10, len(base)))
    params, recall = tune(
        index,
        queries,
        truth,
        sides[side]["target_recall"],
        start=sides[side]["search_params"],
        stored=base,
    )
    if params != sides[side]["search_params"]:
        faiss_index.write_index(index, staging / INDEX_FILES[side])
    return {"search_params": params, "recall_at_10": round(recall, 4), "queries": len(queries),
            "query_side": query_side}  # fmt: skip
