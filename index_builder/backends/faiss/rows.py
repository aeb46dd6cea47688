"""A version's rows read in place: a JSONL file's line offsets found once, a line read and
parsed when its row is asked for.

A loaded version holds, per row, 16 bytes of line offsets (plus 16 per looked-up field)
instead of a parsed dict (about 800 bytes for an image row with one caption): a million rows
a side fit the memory budget of issue 13. Row numbers are the file's non-blank lines, as
`atomic.read_jsonl` counts them.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import operator
import os
import weakref
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, overload

import numpy as np

from index_builder.backends.base import CorruptIndex
from index_builder.filters import Columns

_SCAN = 1 << 22  # bytes per numpy pass when finding lines (bounds the temporaries)
_BATCH = 65536  # rows per batch of offsets turned into Python ints while iterating


def _map(path: Path) -> bytes | mmap.mmap:
    """The file's bytes, memory-mapped (an empty file cannot be mapped)."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return b""
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def _release(data: bytes | mmap.mmap) -> None:
    """Drop a mapping's pages from the process after a pass over the whole file (finding the
    lines, building id lookups): they stay in the page cache but no longer count as the
    service's resident memory (2 GB of rows at 10M a side)."""
    if isinstance(data, mmap.mmap):
        data.madvise(mmap.MADV_DONTNEED)


def _breaks(data: np.ndarray) -> np.ndarray:
    """Offsets of the line breaks text-mode reading splits on: \\n, and \\r not before \\n."""
    found = [np.zeros(0, np.int64)]
    for start in range(0, len(data), _SCAN):
        chunk, after = data[start : start + _SCAN], data[start + 1 : start + _SCAN + 1]
        lone_cr = chunk == 13
        lone_cr[: len(after)] &= after != 10  # a \r at the end of the file is a break
        found.append(np.flatnonzero((chunk == 10) | lone_cr) + start)
    return np.concatenate(found)


def line_spans(data: bytes | mmap.mmap) -> np.ndarray:
    """(start, end) byte offsets, shape (N, 2), of the lines of `data` that are not blank
    (all whitespace to `str.strip`), without their line breaks."""
    if not len(data):
        return np.zeros((0, 2), np.int64)
    buf = np.frombuffer(data, np.uint8)
    breaks = _breaks(buf)
    spans = np.empty((len(breaks) + 1, 2), np.int64)  # filled in place: few temporaries
    spans[0, 0], spans[-1, 1] = 0, len(buf)
    np.add(breaks, 1, out=spans[1:, 0])
    spans[:-1, 1] = breaks
    del breaks
    # A line can be blank only if it is empty or starts with a byte that may begin
    # whitespace (ASCII, or a UTF-8 lead byte such as U+00A0's); a JSON row starts with "{".
    first = buf[np.minimum(spans[:, 0], len(buf) - 1)]
    keep = (spans[:, 0] < spans[:, 1]) & (first > 32) & (first < 128)
    for i in np.flatnonzero(~keep).tolist():
        start, end = spans[i].tolist()
        keep[i] = bool(data[start:end].decode("utf-8").strip())
    return spans if keep.all() else spans[keep]


class JsonlRows(Sequence[dict[str, Any]]):
    """The rows of a JSONL file as a read-only sequence of dicts: the offsets of its non-blank
    lines found once with numpy over the file memory-mapped, and a line parsed (a new dict
    each time) only when its row is read. Passes over the whole file read through the map
    (and drop its pages after); a single row is read with `os.pread` from a descriptor held
    open, so the rows of search hits come through the page cache without being mapped into
    the process (a mapped row's page fault maps the pages around it too, up to 64 KB, which
    stay resident: at 10M items a side, hit rows were most of the service's file-backed
    memory). The file must not change while it is open (versions are immutable; a removed
    version's file stays readable while the map and the descriptor hold it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._data = _map(self.path)
        self._size = len(self._data)
        self._spans = line_spans(self._data)
        _release(self._data)
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    def check(self) -> None:
        """Refuse (CorruptIndex) to read a file truncated since it was mapped: a page past
        its new end would be SIGBUS. One fstat, about a microsecond."""
        if isinstance(self._data, mmap.mmap) and self._data.size() < self._size:
            raise CorruptIndex(f"{self.path} was truncated after it was loaded")

    def __repr__(self) -> str:
        return f"JsonlRows({str(self.path)!r}, rows={len(self)})"

    def __len__(self) -> int:
        return len(self._spans)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return json.loads(self.line(index))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in range(0, len(self), _BATCH):
            self.check()
            for start, end in self._spans[batch : batch + _BATCH].tolist():
                yield json.loads(self._data[start:end].decode("utf-8"))
        _release(self._data)

    def line(self, index: int) -> str:
        """Row `index`'s line as stored (negative counts from the end, as for a list)."""
        i = operator.index(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows of {self.path.name}")
        start, end = self._spans[i].tolist()
        data = os.pread(self._fd, end - start, start)
        if len(data) < end - start:
            raise CorruptIndex(f"{self.path} was truncated after it was loaded")
        return data.decode("utf-8")


class Metas(Sequence[dict[str, Any]]):
    """The `meta` of each of `rows` ({} where absent), read when asked for: filter columns
    are built from it a field at a time, so the metas of a side are never all held."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [row.get("meta") or {} for row in self.rows[index]]
        return self.rows[index].get("meta") or {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (row.get("meta") or {} for row in self.rows)


KEY_FIELDS = {"image": ("id",), "text": ("id", "image_id")}  # the fields rows are looked up by


def key_hash(key: str) -> int:
    """A stable 64-bit hash of a key (blake2b; Python's `hash` is salted per process), so
    lookups can be written with a segment and memory-mapped when it loads."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class KeyIndex:
    """Rows by the value of one field, through the sorted hashes of the values (16 bytes a
    row; a dict of a million ids takes about 120 MB), `offset` added to its row numbers (a
    delta segment's first row). `find` gives the candidate rows, which the caller confirms by
    reading them: hashes may collide."""

    def __init__(self, rows: np.ndarray, hashes: np.ndarray, offset: int = 0) -> None:
        order = np.argsort(hashes, kind="stable")  # equal hashes keep their row order
        self.rows, self.hashes, self.offset = rows[order], hashes[order], offset

    def find(self, key: str) -> list[int]:
        """Rows whose value may be `key`, in row order."""
        hashed = key_hash(key)
        low = int(np.searchsorted(self.hashes, hashed, side="left"))
        high = int(np.searchsorted(self.hashes, hashed, side="right"))
        return (self.rows[low:high] + self.offset).tolist()

    def save(self, path: Path) -> None:
        """Write as one (2, N) int64 `.npy` (hashes, rows), through a temporary file."""
        temporary = path.with_name(path.name + ".tmp.npy")
        np.save(temporary, np.stack([self.hashes, self.rows]).astype(np.int64))
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: Path, offset: int) -> KeyIndex:
        """A saved KeyIndex, memory-mapped: no pass over anything."""
        keys = cls.__new__(cls)
        stored = np.load(path, mmap_mode="r")
        keys.hashes, keys.rows, keys.offset = stored[0], stored[1], offset
        return keys


class KeyIndexes:
    """The KeyIndex of each segment of a side, searched in segment (so row) order."""

    def __init__(self, parts: Sequence[KeyIndex]) -> None:
        self.parts = list(parts)

    def find(self, key: str) -> list[int]:
        return [row for part in self.parts for row in part.find(key)]


def key_indexes(
    rows: Iterable[dict[str, Any]], live: np.ndarray | None, fields: tuple[str, ...]
) -> dict[str, KeyIndex]:
    """A KeyIndex per field over the live rows (`live[i]`, or all rows), in one pass; rows
    whose field is absent or null are left out, other values are keyed as `str(value)`."""
    found = {name: (array("q"), array("q")) for name in fields}
    for i, row in enumerate(rows):
        if live is not None and not live[i]:
            continue
        for name in fields:
            value = row.get(name)
            if value is not None:
                found[name][0].append(i)
                found[name][1].append(key_hash(str(value)))
    return {
        name: KeyIndex(np.frombuffer(numbers, np.int64), np.frombuffer(hashes, np.int64))
        for name, (numbers, hashes) in found.items()
    }


def key_files(meta: str, fields: tuple[str, ...]) -> dict[str, str]:
    """The names of a segment's persisted lookups: field -> `<rows stem>.<field>.keys.npy`."""
    stem = meta.removesuffix(".jsonl")
    return {name: f"{stem}.{name}.keys.npy" for name in fields}


def write_columns(
    directory: Path, meta: str, rows: Sequence[dict[str, Any]], fields: dict[str, str]
) -> str:
    """Write a segment's filter columns of `fields` (`filters.Columns.save`); returns the
    file name, `<rows stem>.columns.npz`."""
    name = meta.removesuffix(".jsonl") + ".columns.npz"
    Columns(Metas(rows)).save(directory / name, fields)
    return name


def write_keys(
    directory: Path, meta: str, rows: Iterable[dict[str, Any]], fields: tuple[str, ...]
) -> list[str]:
    """Write a segment's lookups (`key_files`) over all its rows; returns the file names."""
    names = key_files(meta, fields)
    for name, keys in key_indexes(rows, None, fields).items():
        keys.save(directory / names[name])
    return list(names.values())


class Lines(Protocol):
    """Rows that give a row's line as stored (`JsonlRows`, `segments.SegmentedRows`)."""

    def line(self, index: int) -> str: ...


def write_rows(path: Path, old: Lines, keep: Iterable[int], new: Iterable[dict[str, Any]]) -> None:
    """A version's rows: the lines of `old` at `keep` copied as stored, then `new`
    serialised as `store.write_jsonl` does."""
    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(old.line(i) + "\n" for i in keep)
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in new)
