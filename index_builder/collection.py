"""The live collection: add, upsert and delete items, each change a new version (no rebuild).

A change copies the current version's indexes, appends the new vectors (no retraining: IVF
lists keep their centroids) and tombstones deleted or replaced rows, so it costs the new
items' embedding plus writing the version, not a rebuild. Row numbers stay stable; searches
skip tombstoned rows. When more than `COMPACT_AT` of a side's rows are tombstones, the side is
compacted: rebuilt from its stored vectors into a copy of the trained index.

Deleting an image also deletes the captions that describe it (text rows whose `image_id` is
that image); replacing an image replaces them with the new row's captions.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index_builder import faiss_index
from index_builder.build import (
    OTHER,
    EmbedOptions,
    IndexOptions,
    Rows,
    Sources,
    describe_skips,
    embed_rows,
    index_side,
    read_sources,
    skip_record,
    write_info,
)
from index_builder.bundle import Bundle
from index_builder.filters import check_storable, field_types
from index_builder.rows import JsonlRows, write_rows
from index_builder.store import (
    DELETED_FILES,
    INDEX_FILES,
    META_FILES,
    SIDES,
    VECTOR_FILES,
    IndexStore,
    LoadedIndex,
    write_jsonl,
)

COMPACT_AT = 0.2
EMPTIED = "the change would leave the index empty; build a new one instead"
RECALL_QUERIES = 200  # recall@10 to within ~0.01, in a second at 100k
_CHUNK = 65536


@dataclass
class Change:
    """New rows and their vectors per side, and ids to delete per side."""

    rows: Rows = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    delete: dict[str, set[str]] = field(default_factory=dict)
    upsert: bool = False
    cascade: bool = True  # deleting an image deletes its captions


@dataclass
class ChangeResult:
    version: str
    added: dict[str, int]
    replaced: dict[str, int]
    skipped_existing: dict[str, int]
    deleted: dict[str, int]
    skipped: dict[str, Any] = field(default_factory=dict)  # side -> this change's skip record

    def summary(self) -> str:
        parts = []
        for label, counts in (
            ("added", self.added),
            ("replaced", self.replaced),
            ("already present (skipped; --upsert replaces)", self.skipped_existing),
            ("deleted", self.deleted),
        ):
            text = ", ".join(f"{n} {side}s" for side, n in counts.items() if n)
            if text:
                parts.append(f"{label}: {text}")
        lines = ["; ".join(parts) or "no change"]
        lines += [f"{side}s {describe_skips(r)}" for side, r in self.skipped.items() if r["count"]]
        return "\n".join(lines)


@dataclass
class Plan:
    """A change resolved against a version: rows to append (with their vectors) and rows to
    drop, per side."""

    rows: Rows
    vectors: dict[str, np.ndarray]
    gone: dict[str, set[int]]


def change(
    store: Any,
    current: Any,
    request: Change,
    dataset: dict[str, Any] | None = None,
    bundle_path: str | Path | None = None,
) -> ChangeResult:
    """Apply `request` to `current` (a loaded version of `store`, any backend) as a new
    version of `store` and make it current. The current version is never modified (a
    service may be searching it). Every new row is checked before anything is written: a
    value the version cannot store or filter on is a ValueError naming it."""
    check_rows(request.rows)
    plan, counts = _plan(current, request)
    if not any(plan.rows.values()) and not any(plan.gone.values()):
        return ChangeResult(version=current.version, **counts)  # idempotent: nothing published
    dataset = dataset or current.info.get("dataset") or {}
    path = bundle_path or current.info.get("bundle_path")
    return ChangeResult(version=store.apply(current, plan, dataset, path), **counts)


def check_rows(rows: Rows) -> None:
    """Refuse rows holding a value no version can store or filter on (`check_storable`)."""
    for side, side_rows in rows.items():
        for i, row in enumerate(side_rows):
            check_storable(row, f"{side}s[{i}]")


def write_change(
    store: IndexStore,
    current: LoadedIndex,
    plan: Plan,
    dataset: dict[str, Any],
    bundle_path: str | Path | None,
) -> str:
    """The FAISS backend's change: a staged version whose changed sides append vectors and
    tombstone rows, and whose unchanged sides are copies; returns its name."""
    rows, vectors, gone = plan.rows, plan.vectors, plan.gone
    current.check_files()  # a truncated memory map read below would be SIGBUS
    with store.new_version() as staging:
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
        return staging.name


def _plan(current: Any, request: Change) -> tuple[Plan, dict[str, dict[str, int]]]:
    """Which new rows to append and which current rows to drop, per side."""
    counts: dict[str, dict[str, int]] = {
        key: {side: 0 for side in SIDES}
        for key in ("added", "replaced", "skipped_existing", "deleted")
    }
    gone: dict[str, set[int]] = {side: set() for side in SIDES}
    missing = []
    for side, ids in request.delete.items():
        found = current.rows_of(side, ids) if current.has(side) else {}
        missing += [item_id for item_id in ids if item_id not in found]
        gone[side].update(found.values())
    if missing:
        raise KeyError(f"{len(missing)} ids are not in the index, e.g. {sorted(missing)[0]!r}")
    rows: Rows = {side: [] for side in SIDES}
    keep: dict[str, list[int]] = {side: [] for side in SIDES}
    skipped_images: set[str] = set()
    for side in SIDES:
        new = request.rows.get(side, [])
        present = (
            current.rows_of(side, [str(row["id"]) for row in new]) if current.has(side) else {}
        )
        for i, row in enumerate(new):
            existing = present.get(str(row["id"]))
            kept_image = side == "text" and row.get("image_id") in skipped_images
            if kept_image or (existing is not None and not request.upsert):
                counts["skipped_existing"][side] += 1  # an image kept keeps its captions
                if side == "image":
                    skipped_images.add(str(row["id"]))
                continue
            if existing is not None:
                gone[side].add(existing)
                counts["replaced"][side] += 1
            else:
                counts["added"][side] += 1
            rows[side].append(row)
            keep[side].append(i)
    _cascade(current, rows, gone, request.cascade)
    for side in SIDES:
        counts["deleted"][side] = len(gone[side]) - counts["replaced"][side]
    vectors = {
        side: np.asarray(request.vectors[side][keep[side]], dtype=np.float32)
        for side in SIDES
        if keep[side]
    }
    return Plan(rows, vectors, gone), counts


def _cascade(current: Any, rows: Rows, gone: dict[str, set[int]], deleted: bool) -> None:
    """Captions of replaced images (and of removed ones, with `deleted`) go with them."""
    if not current.has("text") or not current.has("image"):
        return
    images = {str(row["id"]) for row in rows["image"]}
    if deleted:
        images |= {str(row["id"]) for row in current.rows_at("image", sorted(gone["image"]))}
    if images:
        gone["text"].update(current.caption_rows(images))


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
    import faiss

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
    import fcntl

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
    queries = faiss_index.sample_rows([source], RECALL_QUERIES, seed=1)
    truth = faiss_index.exact_knn(queries, [base], min(10, len(base)))
    params, recall = faiss_index.tune(
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


def delete_ids(
    store: Any,
    ids: list[str],
    side: str | None = None,
    keep_bundle: Any = None,
    current: Any = None,
) -> ChangeResult:
    """Remove items by id from one side, or from every side that holds them (then an image's
    captions go with it); an id found nowhere is a KeyError. `store`: any backend's; the
    change starts from `current` (a service passes the version it serves), by default the
    store's current version."""
    current = current or store.open(bundle=keep_bundle)
    wanted = set(ids)
    if not wanted:
        raise ValueError("no ids to delete")
    sides = [side] if side else list(current.sides)
    delete = {s: set(current.rows_of(s, wanted)) if current.has(s) else set() for s in sides}
    missing = wanted - set().union(*delete.values())
    if missing:
        raise KeyError(f"{len(missing)} ids are not in the index, e.g. {sorted(missing)[0]!r}")
    return change(store, current, Change(delete=delete, cascade=side is None))


def add_sources(
    root: str | Path,
    bundle: Bundle,
    sources: Sources,
    embedding: EmbedOptions | None = None,
    keep: int = 3,
    upsert: bool = False,
    store: Any = None,
) -> ChangeResult:
    """Add the sources' items to the current version (same bundle) as a new version: ids
    already present are skipped, or replaced with `upsert`. `store` (default: the FAISS
    versions under `root`) may be any backend's; `root` holds the embedding work files."""
    root = Path(root)
    store = store or IndexStore(root, keep)
    current = store.open(bundle=bundle)
    rows, skips = read_sources(root, sources)
    work, rows, shards = embed_rows(root, bundle, rows, embedding or EmbedOptions(), skips)
    vectors = {
        side: np.concatenate([np.asarray(s) for s in shards[side]]) for side in SIDES if rows[side]
    }
    result = change(
        store,
        current,
        Change(rows=rows, vectors=vectors, upsert=upsert),
        dataset=sources.describe(),
        bundle_path=bundle.path,
    )
    result.skipped = {side: skip_record(skips[side]) for side in SIDES if skips[side].total}
    shutil.rmtree(work, ignore_errors=True)
    return result
