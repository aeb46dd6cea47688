"""Writing a FAISS version into a staging directory: a new one from rows and vectors (each
side built, saved and tuned), or a change of the current one.

A change writes only what changed (`segments`): the new rows as a delta segment (an emptied
copy of the trained index holding their vectors: no retraining, IVF lists keep their
centroids; the vectors; the rows and their id lookups) and the side's tombstones (deleted or
replaced rows), and carries the unchanged segments. It costs the new items' embedding plus
writing them, not the collection. Row numbers stay stable; searches skip tombstoned rows.
When tombstones or delta rows pass `COMPACT_AT` / `DELTA_AT` of a side's rows (or deltas
`MAX_DELTAS`), the side is compacted: rebuilt from its stored live vectors into a copy of
the trained index, one base segment, its search parameters re-tuned.
"""

from __future__ import annotations

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
from index_builder.backends.faiss.rows import (
    KEY_FIELDS,
    JsonlRows,
    write_columns,
    write_keys,
    write_rows,
)
from index_builder.backends.faiss.search import tune
from index_builder.backends.faiss.segments import carry, checksums, copy_file, segment_files
from index_builder.backends.faiss.version import (
    DELETED_FILES,
    INDEX_FILES,
    INDEX_JSON,
    VECTOR_FILES,
    LoadedIndex,
)
from index_builder.backends.recall import TUNE_MARGIN, blocks, exact_knn, sample_rows
from index_builder.filters import field_types, merge_field_types

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
        keys = write_keys(staging, META_FILES[side], rows[side], KEY_FIELDS[side])
        other = shards[OTHER[side]] if OTHER[side] in present else None
        sides[side] = index_side(side, shards[side], other, dim, options, staging, resume)
        sides[side]["keys"] = keys
        sides[side]["fields"] = field_types(row.get("meta") or {} for row in rows[side])
        sides[side]["columns"] = write_columns(
            staging, META_FILES[side], rows[side], sides[side]["fields"]
        )
        sides[side]["meta_bytes"] = (staging / META_FILES[side]).stat().st_size
        sides[side]["skipped"] = skipped.get(side, {"count": 0, "examples": []})
        _record_checksums(staging, sides[side])
    write_info(staging, bundle_id, bundle_path, dim, dataset, None, sides)


def _record_checksums(staging: Path, info: dict[str, Any]) -> None:
    """Set the side's "checksums" record for its files as written (`segments.checksums`)."""
    record = checksums(staging, info)
    info.pop("checksums", None)
    if record:
        info["checksums"] = record


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


COMPACT_AT = 0.2  # compact a side when this fraction of its rows are tombstones,
DELTA_AT = 0.1  # or this fraction are in delta segments,
MAX_DELTAS = 16  # or it has this many delta segments
_CHUNK = 65536


def write_change(
    staging: Path,
    current: LoadedIndex,
    plan: Plan,
    dataset: dict[str, Any],
    bundle_path: str | Path | None,
) -> None:
    """A changed version in `staging`: changed sides gain a delta segment and tombstones (or
    are compacted), unchanged sides carry their files (`segments.carry`)."""
    rows, vectors, gone = plan.rows, plan.vectors, plan.gone
    sides, measure = {}, set()
    for side in SIDES:
        if current.has(side) and not rows[side] and not gone[side]:
            sides[side] = _carry_side(current, side, staging)
        elif current.has(side):
            sides[side] = _change_side(
                current, side, rows[side], vectors.get(side), gone[side], staging
            )
            if not sides[side].get("segments"):
                measure.add(side)  # compacted: one new base
        elif rows[side]:
            other = _other_vectors(current, OTHER[side], vectors)
            sides[side] = index_side(
                side, [vectors[side]], other, current.embed_dim, IndexOptions(), staging
            )
            write_jsonl(staging / META_FILES[side], rows[side])
            keys = write_keys(staging, META_FILES[side], rows[side], KEY_FIELDS[side])
            sides[side]["keys"] = keys
            sides[side]["fields"] = field_types(r.get("meta") or {} for r in rows[side])
            sides[side]["columns"] = write_columns(
                staging, META_FILES[side], rows[side], sides[side]["fields"]
            )
            sides[side]["meta_bytes"] = (staging / META_FILES[side]).stat().st_size
            sides[side]["skipped"] = {"count": 0, "reasons": {}, "examples": []}
            measure.add(side)
        if side in sides:
            _record_checksums(staging, sides[side])
    if not any(info["count"] for info in sides.values()):
        raise ValueError(EMPTIED)
    for side in measure & {side for side, info in sides.items() if info["count"]}:
        sides[side].update(_measure(staging, sides, side))
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
    """Write one side of the new version: a delta segment of the new rows and the updated
    tombstones, the other segments carried; compacted into one base when tombstones pass
    `COMPACT_AT` of the rows, delta rows `DELTA_AT`, or deltas number `MAX_DELTAS`."""
    if faiss_index.is_on_disk(current.indexes[side]):
        raise ValueError("an on-disk index cannot be changed in place; run `cots index rebuild`")
    total, info = len(current.rows(side)), current.info["sides"][side]
    added = new_vectors if new_vectors is not None else np.zeros((0, current.embed_dim))
    added = np.asarray(added, dtype=np.float32)
    deleted = np.zeros(total + len(new_rows), dtype=bool)
    if current.deleted.get(side) is not None:
        deleted[:total] = current.deleted[side]
    deleted[list(gone)] = True
    started = time.perf_counter()
    deltas = info.get("segments", [])
    delta_rows = sum(int(d["rows"]) for d in deltas) + len(new_rows)
    if (
        deleted.mean() > COMPACT_AT
        or delta_rows > DELTA_AT * len(deleted)
        or len(deltas) >= MAX_DELTAS
    ):
        out = _compact(current, side, new_rows, added, deleted, staging)
    else:
        out = _append_delta(current, side, new_rows, added, staging)
        out.pop("deleted_file", None)
        if deleted.any():
            np.save(staging / DELETED_FILES[side], np.flatnonzero(deleted))
            out["deleted_file"] = DELETED_FILES[side]
        out.update(count=int((~deleted).sum()), rows=len(deleted), deleted=int(deleted.sum()))
    out["build_seconds"] = round(time.perf_counter() - started, 3)
    return out


def _compact(
    current: LoadedIndex,
    side: str,
    new_rows: list[dict[str, Any]],
    added: np.ndarray,
    deleted: np.ndarray,
    staging: Path,
) -> dict[str, Any]:
    """The side's live rows and vectors as one new base, in a copy of the trained index."""
    total, index = len(current.rows(side)), current.indexes[side]
    old = current.vectors.get(side)
    old = old if old is not None else index.reconstruct_n(0, index.ntotal)
    kept = ~deleted
    vectors = np.concatenate([old[np.flatnonzero(kept[:total])], added[kept[total:]]])
    updated = faiss_index.for_adding(faiss.clone_index(index))
    updated.reset()
    _add(updated, vectors)
    np.save(staging / VECTOR_FILES[side], vectors)
    faiss_index.write_index(updated, staging / INDEX_FILES[side])
    new = [row for row, keep in zip(new_rows, kept[total:], strict=True) if keep]
    meta = META_FILES[side]
    write_rows(staging / meta, current.row_files[side], np.flatnonzero(kept[:total]), new)
    rows = JsonlRows(staging / meta)  # the written rows, read back
    info = {**current.info["sides"][side]}
    for key in ("segments", "template", "shared", "checksums", "deleted_file"):
        info.pop(key, None)
    fields = field_types(row.get("meta") or {} for row in rows)
    info.update(
        file=INDEX_FILES[side],
        meta=meta,
        vectors=VECTOR_FILES[side],
        keys=write_keys(staging, meta, rows, KEY_FIELDS[side]),
        columns=write_columns(staging, meta, rows, fields),
        meta_bytes=(staging / meta).stat().st_size,
        count=len(rows),
        rows=len(rows),
        deleted=0,
        fields=fields,
        bytes=(staging / INDEX_FILES[side]).stat().st_size,
    )
    return info


def _append_delta(
    current: LoadedIndex,
    side: str,
    new_rows: list[dict[str, Any]],
    added: np.ndarray,
    staging: Path,
) -> dict[str, Any]:
    """The side's segments carried, and the new rows (if any) as one more delta segment:
    an emptied copy of the trained index holding their vectors, the vectors, the rows and
    their lookups."""
    info = _carried(current, side, staging)
    if not new_rows:
        return info
    deltas = list(info.get("segments", []))
    tag = f"d{len(deltas) + 1}"
    names = {
        "file": f"{side}.{tag}.faiss",
        "vectors": f"{side}.{tag}.npy",
        "meta": META_FILES[side].replace(".jsonl", f".{tag}.jsonl"),
    }
    delta = _template(current, side, staging, info)
    _add(delta, added)
    faiss_index.write_index(delta, staging / names["file"])
    np.save(staging / names["vectors"], added)
    write_jsonl(staging / names["meta"], new_rows)
    keys = write_keys(staging, names["meta"], new_rows, KEY_FIELDS[side])
    metas = (row.get("meta") or {} for row in new_rows)
    info["fields"] = merge_field_types(info.get("fields", {}), field_types(metas))
    columns = write_columns(staging, names["meta"], new_rows, info["fields"])
    size = (staging / names["meta"]).stat().st_size
    segment = {**names, "rows": len(new_rows), "keys": keys, "columns": columns, "meta_bytes": size}
    info["segments"] = [*deltas, segment]
    return info


def _template(current: LoadedIndex, side: str, staging: Path, info: dict[str, Any]) -> Any:
    """The side's trained index, emptied: read from its template file, or (the first delta
    of a base) an emptied clone of the loaded index, written as the template."""
    if info.get("template"):
        return faiss_index.for_adding(faiss_index.read_index(staging / info["template"]))
    empty = faiss_index.for_adding(faiss.clone_index(current.indexes[side]))
    empty.reset()
    info["template"] = f"{side}.empty.faiss"
    faiss_index.write_index(empty, staging / info["template"])
    return empty


def _carried(current: LoadedIndex, side: str, staging: Path) -> dict[str, Any]:
    """The side's description, its segments carried into `staging` ("shared": those linked)."""
    info = {**current.info["sides"][side]}
    info.pop("shared", None)
    shared = carry(current.path, staging, segment_files(info), current.info["sides"][side])
    return {**info, "shared": shared} if shared else info


def _carry_side(current: LoadedIndex, side: str, staging: Path) -> dict[str, Any]:
    """An unchanged side: its segments carried (`segments.carry`), its tombstones copied."""
    info = _carried(current, side, staging)
    if info.get("deleted_file"):
        copy_file(current.path / info["deleted_file"], staging / info["deleted_file"])
    return info


def _add(index: Any, vectors: np.ndarray) -> None:
    for start in range(0, len(vectors), _CHUNK):
        index.add(np.ascontiguousarray(vectors[start : start + _CHUNK], dtype=np.float32))


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
        margin=TUNE_MARGIN,
    )
    if params != sides[side]["search_params"]:
        faiss_index.write_index(index, staging / INDEX_FILES[side])
    return {"search_params": params, "recall_at_10": round(recall, 4), "queries": len(queries),
            "query_side": query_side}  # fmt: skip
