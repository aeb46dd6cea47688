"""A FAISS side as segments: an immutable base (index, vectors, rows) and small delta segments
appended by changes, read as one side with global, stable row numbers (the base's rows, then
each delta's in order).

A delta's index is the base's trained index emptied and filled with the delta's vectors; a
version loads by reading the base index and merging each delta's inverted lists (or codes)
into it, so a loaded side searches exactly as one index holding every row. A delta's rows and
vectors are read in place beside the base's (`SegmentedRows`, `SegmentedVectors`).

Files a change carries into the new version unchanged are copied when the side's carried
files are under `SHARE_BYTES`; above it they are hard links made read-only (0444), listed in
`index.json` ("shared"). A hard link is one file in two versions (a damaged one is damaged in
its rollback target too, issue 25): the trade-off is taken only where copying costs seconds.
Such a side's files have their size and blake2b checksum recorded ("checksums") by the build or
change that wrote them, while they are still in the page cache: sizes are checked at load,
checksums by `cots index verify`, and a change never reads a shared file to checksum it (the
first change after a 10M build read 25 GB for it).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import faiss
import numpy as np

from index_builder.backends.base import CorruptIndex
from index_builder.backends.faiss.rows import JsonlRows
from index_builder.backends.faiss.search import gathered

SHARE_BYTES = 1 << 30  # a side's carried files above this are hard links, below it copies
_READ = 1 << 22


def segment_infos(side_info: dict[str, Any]) -> list[dict[str, Any]]:
    """The side's segments, base first: each with its file, meta, vectors (maybe None) and
    rows."""
    deltas = side_info.get("segments", [])
    base_rows = int(side_info["rows"]) - sum(int(d["rows"]) for d in deltas)
    names = ("file", "meta", "vectors", "keys", "columns", "meta_bytes")
    base = {k: side_info.get(k) for k in names}
    return [{**base, "keys": base["keys"] or [], "rows": base_rows}, *deltas]


def segment_files(side_info: dict[str, Any]) -> list[str]:
    """Every file of the side's segments (index, rows, vectors, id lookups), base first."""
    names = []
    for segment in segment_infos(side_info):
        names += [segment[k] for k in ("file", "meta", "vectors", "columns") if segment.get(k)]
        names += segment.get("keys", [])
    if side_info.get("template"):
        names.append(side_info["template"])
    return names


class SegmentedRows(Sequence[dict[str, Any]]):
    """The rows of several JSONL segments as one read-only sequence (see `JsonlRows`)."""

    def __init__(self, parts: Sequence[JsonlRows]) -> None:
        self.parts = list(parts)
        self.path = self.parts[0].path
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, index: int) -> tuple[JsonlRows, int]:
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows of {self.path.name}")
        i %= len(self)
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part], i - int(self.starts[part])

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        part, local = self._locate(index)
        return part[local]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for part in self.parts:
            yield from part

    def line(self, index: int) -> str:
        part, local = self._locate(index)
        return part.line(local)

    def check(self) -> None:
        for part in self.parts:
            part.check()


class SegmentedVectors:
    """Row-aligned stored vectors of several memory-mapped `.npy` segments, indexed as one
    (N, d) array: an int, a slice, or an array of row numbers (a gather)."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.starts[-1]), int(self.parts[0].shape[1]))
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.concatenate([np.asarray(p, dtype=dtype) for p in self.parts])

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        rows = np.asarray(index, dtype=np.int64)
        if rows.ndim == 0:
            part = int(np.searchsorted(self.starts, int(rows), side="right")) - 1
            return np.asarray(self.parts[part][int(rows) - int(self.starts[part])])
        out = np.empty((len(rows), self.shape[1]), np.float32)
        parts = np.searchsorted(self.starts, rows, side="right") - 1
        for p in np.unique(parts).tolist():
            at = parts == p
            out[at] = gathered(self.parts[p], rows[at] - self.starts[p])  # pread
        return out

    def truncated(self) -> bool:
        """Whether a mapped part is shorter than when it was mapped (reading it: SIGBUS)."""
        for part in self.parts:
            mapped = getattr(part, "_mmap", None)
            if mapped is not None and mapped.size() < part.offset + part.nbytes:  # type: ignore[attr-defined]
                return True
        return False


def merge_delta(index: Any, delta: Any, vectors: np.ndarray | None) -> None:
    """Append a delta segment's rows to a loaded base `index`: its inverted lists moved (IVF),
    its codes (flat), or its vectors added (HNSW has no merge)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        ivf.merge_from(faiss.extract_index_ivf(delta), ivf.ntotal)
        index.ntotal = ivf.ntotal  # a wrapper (OPQ) keeps its own count
    elif isinstance(index, faiss.IndexFlatCodes):
        index.merge_from(delta, 0)
    else:
        added = vectors if vectors is not None else delta.reconstruct_n(0, delta.ntotal)
        index.add(np.ascontiguousarray(added, dtype=np.float32))


def checksum(path: Path) -> str:
    """The file's blake2b digest (hex), read in 4 MB blocks."""
    digest = hashlib.blake2b()
    with path.open("rb") as handle:
        while block := handle.read(_READ):
            digest.update(block)
    return digest.hexdigest()


def checksums(root: Path, side_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The "checksums" record of a side written under `root`: the size and blake2b digest of
    each of its segment files when together they reach SHARE_BYTES (files a later change will
    share), else {}. Digests `side_info` already records for a file of the same size are kept,
    the others read (files just written: from the page cache)."""
    names = segment_files(side_info)
    sizes = {name: (root / name).stat().st_size for name in names}
    if sum(sizes.values()) < SHARE_BYTES:
        return {}
    known = recorded(side_info)
    out = {}
    for name, size in sizes.items():
        digest = known[name]["blake2b"] if known.get(name, {}).get("bytes") == size else None
        out[name] = {"bytes": size, "blake2b": digest or checksum(root / name)}
    return out


def recorded(side_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Size and checksum by file name, as the side records them ("checksums", "shared")."""
    return {**side_info.get("shared", {}), **side_info.get("checksums", {})}


def carry(source: Path, target: Path, names: Sequence[str], side_info: dict[str, Any]) -> dict:
    """Bring the files `names` of `source` (an older version) into `target` unchanged: copies
    when together under SHARE_BYTES, else read-only hard links. Returns the "shared" record
    (name -> bytes and checksum, as `side_info` records them, else read)."""
    known = recorded(side_info)
    sizes = {name: (source / name).stat().st_size for name in names}
    if sum(sizes.values()) < SHARE_BYTES:
        for name in names:
            copy_file(source / name, target / name)
        return {}
    shared = {}
    for name in names:
        os.chmod(source / name, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.link(source / name, target / name)
        digest = known.get(name, {}).get("blake2b") or checksum(source / name)
        shared[name] = {"bytes": sizes[name], "blake2b": digest}
    return shared


def check_sizes(path: Path, version: str, side_info: dict[str, Any]) -> None:
    """Refuse (CorruptIndex) a version whose recorded files (shared, checksummed), or
    segments' rows, are not their recorded size (rows are read only when asked for: a cut
    last row would go unseen)."""
    sizes = {name: record["bytes"] for name, record in recorded(side_info).items()}
    for segment in segment_infos(side_info):
        if segment.get("meta_bytes") is not None:
            sizes[segment["meta"]] = segment["meta_bytes"]
    for name, expected in sizes.items():
        size = (path / name).stat().st_size
        if size != expected:
            raise CorruptIndex(
                f"index version {version} is truncated or damaged: {name} has {size} bytes, "
                f"{expected} recorded"
            )


def verify(path: Path, info: dict[str, Any]) -> list[str]:
    """Problems with a version's files: missing ones, and those whose size or checksum differs
    from the recorded (empty: all well)."""
    problems = []
    for side, side_info in info["sides"].items():
        for name in segment_files(side_info):
            if not (path / name).is_file():
                problems.append(f"{side}: {name} is missing")
        shared = side_info.get("shared", {})
        for name, record in recorded(side_info).items():
            file = path / name
            if not file.is_file():
                continue
            if file.stat().st_size != record["bytes"] or checksum(file) != record["blake2b"]:
                kind = "shared file" if name in shared else "file"
                problems.append(f"{side}: {kind} {name} does not match its checksum")
    return problems


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
