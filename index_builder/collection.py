"""The live collection: add, upsert and delete items, each change a new version (no rebuild).

A change is resolved here against the current version, for any backend, into a `Plan` (rows
to append with their vectors, rows to drop); the store writes it as a new version
(`Store.apply`: the FAISS backend appends and tombstones, `backends/faiss/write.py`).

Deleting an image also deletes the captions that describe it (text rows whose `image_id` is
that image); replacing an image replaces them with the new row's captions.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.backends import open_store
from index_builder.backends.base import SIDES, Plan, Store, Version
from index_builder.build import (
    EmbedOptions,
    Rows,
    Sources,
    describe_skips,
    embed_rows,
    read_sources,
    skip_record,
)
from index_builder.bundle import Bundle
from index_builder.filters import check_storable


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


def change(
    store: Store,
    current: Version,
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


def _plan(current: Version, request: Change) -> tuple[Plan, dict[str, dict[str, int]]]:
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


def _cascade(current: Version, rows: Rows, gone: dict[str, set[int]], deleted: bool) -> None:
    """Captions of replaced images (and of removed ones, with `deleted`) go with them."""
    if not current.has("text") or not current.has("image"):
        return
    images = {str(row["id"]) for row in rows["image"]}
    if deleted:
        images |= {str(row["id"]) for row in current.rows_at("image", sorted(gone["image"]))}
    if images:
        gone["text"].update(current.caption_rows(images))


def delete_ids(
    store: Store,
    ids: list[str],
    side: str | None = None,
    keep_bundle: Bundle | None = None,
    current: Version | None = None,
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
    store: Store | None = None,
) -> ChangeResult:
    """Add the sources' items to the current version (same bundle) as a new version: ids
    already present are skipped, or replaced with `upsert`. `store` (default: the FAISS
    versions under `root`) may be any backend's; `root` holds the embedding work files."""
    root = Path(root)
    store = store or open_store(root, keep=keep)
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
