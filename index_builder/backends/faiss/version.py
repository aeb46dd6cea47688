"""One FAISS version: its files, and the version loaded (indexes, rows, stored vectors and
tombstones) and searched."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index_builder import filters
from index_builder.backends.base import (
    SIDES,
    BundleIdentity,
    CorruptIndex,
    Hit,
    check_bundle,
    check_offset,
    check_vectors,
    found_rows,
    ranked_hits,
)
from index_builder.backends.faiss.faiss_index import read_index, split_lists
from index_builder.backends.faiss.rows import (
    KEY_FIELDS,
    JsonlRows,
    KeyIndex,
    KeyIndexes,
    Metas,
    key_files,
    key_indexes,
)
from index_builder.backends.faiss.search import pinned, search_index
from index_builder.backends.faiss.segments import (
    SegmentedRows,
    SegmentedVectors,
    check_sizes,
    merge_delta,
    segment_infos,
)
from index_builder.filters import Columns

INDEX_JSON = "index.json"
INDEX_FILES = {"image": "image.faiss", "text": "text.faiss"}
# Row-aligned float32 unit vectors (exact filtered search, changes without re-embedding) and
# tombstoned row numbers (deleted or replaced items, skipped by every search).
VECTOR_FILES = {"image": "image.npy", "text": "text.npy"}
DELETED_FILES = {"image": "image.deleted.npy", "text": "text.deleted.npy"}


@dataclass
class LoadedIndex:
    """One version in memory: the FAISS index, rows (memory-mapped, parsed when read),
    stored vectors and tombstones of each present side, and `index.json`. Either side may be
    absent (a photo folder has no texts)."""

    version: str
    path: Path
    info: dict[str, Any]
    row_files: dict[str, JsonlRows | SegmentedRows]
    indexes: dict[str, Any] = field(repr=False)
    vectors: dict[str, Any] = field(repr=False)
    deleted: dict[str, np.ndarray | None] = field(repr=False)
    _columns: dict[str, Columns] = field(default_factory=dict, repr=False)
    _keys: dict[str, dict[str, KeyIndexes]] = field(default_factory=dict, repr=False)

    @property
    def embed_dim(self) -> int:
        return int(self.info["embed_dim"])

    @property
    def bundle_id(self) -> str:
        return str(self.info["bundle_id"])

    @property
    def sides(self) -> tuple[str, ...]:
        return tuple(side for side in SIDES if side in self.indexes)

    def has(self, side: str) -> bool:
        return side in self.indexes

    @property
    def images(self) -> Sequence[dict[str, Any]]:
        return self.rows("image")

    @property
    def texts(self) -> Sequence[dict[str, Any]]:
        return self.rows("text")

    def rows(self, side: str) -> Sequence[dict[str, Any]]:
        """Every row of a side, tombstoned ones included (row numbers are stable); read-only,
        each row parsed when read."""
        return self.row_files.get(side, ())

    def live_count(self, side: str) -> int:
        deleted = self.deleted.get(side)
        return len(self.rows(side)) - (0 if deleted is None else int(deleted.sum()))

    def row_of(self, side: str, item_id: str) -> int | None:
        """The live row holding `item_id` (the last, should several), or None."""
        stored = self.rows(side)
        found = [
            i
            for i in self._keyed(side, "id").find(item_id)
            if self.is_live(side, i) and str(stored[i]["id"]) == item_id
        ]
        return found[-1] if found else None

    def rows_of(self, side: str, item_ids: Iterable[str]) -> dict[str, int]:
        """The live rows of those of `item_ids` present on `side` (id -> row)."""
        found = {item_id: self.row_of(side, item_id) for item_id in item_ids}
        return {item_id: row for item_id, row in found.items() if row is not None}

    def rows_at(self, side: str, rows: Sequence[int]) -> list[dict[str, Any]]:
        """The stored rows (id, content, meta) at row numbers `rows`."""
        stored = self.rows(side)
        return [stored[int(row)] for row in rows]

    def caption_rows(self, image_ids: set[str]) -> list[int]:
        """Live text rows that describe one of `image_ids` (their `image_id`)."""
        keyed, stored = self._keyed("text", "image_id"), self.rows("text")
        found = {i for image_id in image_ids for i in keyed.find(image_id)}
        return [
            i
            for i in sorted(found)
            if self.is_live("text", i) and stored[i].get("image_id") in image_ids
        ]

    def _keyed(self, side: str, name: str) -> KeyIndexes:
        """The rows of `side` by `name` ("id"; a text's "image_id"), tombstoned ones included
        (callers skip them): per segment, its lookup file memory-mapped, or (a version written
        before them) built on first use in one pass over the segment's rows."""
        if side not in self._keys:
            names = KEY_FIELDS[side]
            segments = segment_infos(self.info["sides"][side])
            rows = self.rows(side)
            parts = rows.parts if isinstance(rows, SegmentedRows) else [rows]
            found: dict[str, list[KeyIndex]] = {n: [] for n in names}
            start = 0
            for segment, part in zip(segments, parts, strict=True):
                files = key_files(str(segment["meta"]), names)
                if all(files[n] in segment.get("keys", []) for n in names):
                    for n in names:
                        found[n].append(KeyIndex.load(self.path / files[n], start))
                else:
                    for n, keys in key_indexes(part, None, names).items():
                        keys.offset = start
                        found[n].append(keys)
                start += len(part)
            self._keys[side] = {n: KeyIndexes(parts) for n, parts in found.items()}
        return self._keys[side][name]

    def is_live(self, side: str, row: int) -> bool:
        deleted = self.deleted.get(side)
        return deleted is None or not deleted[row]

    def check_files(self) -> None:
        """Refuse (CorruptIndex) to read memory-mapped files truncated since they were loaded
        (SIGBUS otherwise): a few fstat calls, before every search."""
        for side in self.sides:
            rows = self.row_files.get(side)
            if isinstance(rows, JsonlRows | SegmentedRows):
                rows.check()
            vectors = self.vectors.get(side)
            if isinstance(vectors, SegmentedVectors):
                truncated = vectors.truncated()
            else:
                mapped = getattr(vectors, "_mmap", None)
                truncated = mapped is not None and mapped.size() < vectors.offset + vectors.nbytes  # type: ignore[union-attr]
            if truncated:
                name = self.info["sides"][side].get("vectors")
                raise CorruptIndex(
                    f"index version {self.version}: {name} was truncated after it was loaded"
                )

    def vector(self, side: str, row: int) -> np.ndarray:
        """The stored unit vector of one row."""
        self.check_files()
        stored = self.vectors.get(side)
        if stored is not None:
            return np.asarray(stored[row], dtype=np.float32)
        return np.asarray(self.indexes[side].reconstruct(int(row)), dtype=np.float32)

    def check_bundle(self, bundle: BundleIdentity) -> None:
        """Refuse a bundle other than the one that embedded this index."""
        check_bundle(bundle, self.info, self.version)

    def count(self, side: str, filter: dict[str, Any] | None = None) -> int:
        """Live rows of `side` whose metadata satisfies `filter`."""
        mask = self.filter_mask(side, filter)
        if mask is None:
            return self.live_count(side)
        deleted = self.deleted.get(side)
        return int((mask if deleted is None else mask & ~deleted).sum())

    def filter_mask(self, side: str, filter: dict[str, Any] | None) -> np.ndarray | None:
        """Rows of `side` whose metadata satisfies `filter` (None: no filter); a filter that
        does not fit the side's fields is a FilterError."""
        clauses = filters.parse(filter, self.info["sides"][side].get("fields", {}))
        if not clauses:
            return None
        return self._columns_of(side).mask(clauses)

    def warm(self, side: str) -> None:
        """Build the id lookups and, in one pass, the filter columns of every metadata field
        of `side` now (a service does, off the event loop, when it loads a version)."""
        self.row_of(side, "")
        self._columns_of(side).build(self.info["sides"][side].get("fields", {}))

    def _columns_of(self, side: str) -> Columns:
        """The side's filter columns: those its segments saved, loaded; others built when
        first used."""
        if side not in self._columns:
            columns = Columns(Metas(self.rows(side)))
            segments = segment_infos(self.info["sides"][side])
            saved = [(self.path / s["columns"] if s.get("columns") else None, int(s["rows"]))
                     for s in segments]  # fmt: skip
            if any(path for path, _ in saved):
                columns.load(saved)
            self._columns[side] = columns
        return self._columns[side]

    def search(
        self,
        side: str,
        vectors: np.ndarray,
        k: int,
        mask: np.ndarray | None = None,
        *,
        filter: dict[str, Any] | None = None,
        exclude: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product on one side among live rows (and where `mask` is True, the
        metadata satisfies `filter`, and the row is not `exclude`): (scores (Q, k'), rows
        (Q, k')) with k' = min(k, live rows); -1 pads missing rows."""
        vectors = check_vectors(self, side, vectors, k)
        self.check_files()
        wanted = self.filter_mask(side, filter)
        if wanted is not None:
            mask = wanted if mask is None else mask & wanted
        if exclude is not None:
            mask = np.ones(len(self.rows(side)), bool) if mask is None else mask.copy()
            mask[exclude] = False
        deleted = self.deleted.get(side)
        if deleted is not None:
            mask = ~deleted if mask is None else mask & ~deleted
        rerank = int(self.info["sides"][side]["search_params"].get("rerank", 1))
        return search_index(self.indexes[side], self.vectors.get(side), vectors, k, mask, rerank)

    def find(
        self,
        side: str,
        vectors: np.ndarray,
        k: int,
        *,
        offset: int = 0,
        filter: dict[str, Any] | None = None,
        exclude: int | None = None,
    ) -> list[list[Hit]]:
        """The hits ranked offset+1 .. offset+k per query, with their rows read once (the
        distinct rows of every query's page, in row order)."""
        check_offset(offset)
        scores, rows = self.search(side, vectors, k + offset, filter=filter, exclude=exclude)
        found = found_rows(rows, offset)
        items = dict(zip(found, self.rows_at(side, found), strict=True))
        return ranked_hits(scores, rows, offset, items)


def load_side(loaded: LoadedIndex, side: str, side_info: dict[str, Any]) -> None:
    """Read one side's segments (index, rows, vectors memory-mapped) as one, and its
    tombstones, into `loaded`."""
    path, version = loaded.path, loaded.version
    segments = segment_infos(side_info)
    index = read_index(path / side_info["file"], side_info["search_params"])
    files = [JsonlRows(path / str(s["meta"])) for s in segments]
    stored = [_vectors(loaded, s["vectors"]) for s in segments]
    for segment, delta in zip(segments[1:], stored[1:], strict=True):
        merge_delta(index, read_index(path / segment["file"]), delta)
    split_lists(index)
    rows = files[0] if len(files) == 1 else SegmentedRows(files)
    if index.ntotal != len(rows):
        raise ValueError(
            f"index version {version} is inconsistent: {side} index holds "
            f"{index.ntotal} vectors for {len(rows)} rows"
        )
    check_sizes(path, version, side_info)
    vectors: Any = None
    if all(v is not None for v in stored):
        parts: list[np.ndarray] = [v for v in stored if v is not None]
        vectors = parts[0] if len(parts) == 1 else SegmentedVectors(parts)
        if vectors.shape != (len(rows), loaded.embed_dim):
            raise ValueError(
                f"index version {version} is inconsistent: {side} vectors have shape "
                f"{vectors.shape} for {len(rows)} rows"
            )
    deleted = None
    if side_info.get("deleted_file"):
        deleted = np.zeros(len(rows), dtype=bool)
        deleted[np.load(path / side_info["deleted_file"])] = True
    loaded.indexes[side], loaded.row_files[side] = index, rows
    loaded.vectors[side], loaded.deleted[side] = vectors, deleted


def _vectors(loaded: LoadedIndex, name: str | None) -> np.ndarray | None:
    """A segment's stored vectors, memory-mapped (None: not stored)."""
    if not name:
        return None
    try:
        return pinned(np.load(loaded.path / name, mmap_mode="r"))  # readable once pruned
    except ValueError as exc:  # numpy: "mmap length is greater than file size"
        raise CorruptIndex(
            f"index version {loaded.version} is truncated or damaged: {name} "
            f"cannot be mapped ({exc})"
        ) from None
