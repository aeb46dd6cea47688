"""A field's inverted index as arrays, in memory and on disk (`filters.Columns` uses them).

Per kind of value ("string", "number", "bool") a `Group`: the distinct keys sorted (strings as
UTF-8 bytes, each ending in END; numbers float64; booleans), where each key's rows start, and
the rows grouped by key. Loading is a few `np.load`s, a lookup a `np.searchsorted`, and
merging the groups saved for consecutive parts of the rows one stable argsort: no Python loop
per key. A file has, per field i, `f{i}.{kind}.keys|starts|rows` and `n{i}` (the float column
of a number or mixed field); files saved before this layout (`k{i}`: the keys as JSON, in
first-seen order) are read and regrouped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("string", "number", "bool")
# Ends every string key: a byte UTF-8 never holds, so numpy's fixed-width bytes (which drop
# trailing NULs) keep "a\0" apart from "a". It sorts a string after every longer one it starts.
END = b"\xff"
LAYOUT = 2


def row_type(count: int) -> type[np.signedinteger]:
    """The row numbers' dtype for `count` rows: int32 where it fits."""
    return np.int32 if count <= np.iinfo(np.int32).max else np.int64


def keys_of(kind: str, values: Sequence[Any]) -> np.ndarray:
    """The key array of `values` of one kind (not sorted)."""
    if kind == "string":
        return np.array([value.encode() + END for value in values], dtype="S")
    return np.array(values, dtype=np.float64 if kind == "number" else np.bool_)


def spans(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Positions first[0]..last[0]-1, then first[1]..last[1]-1, ... in one array."""
    lengths = last - first
    offsets = np.repeat(first - np.cumsum(lengths) + lengths, lengths)
    return offsets + np.arange(len(offsets))


@dataclass(frozen=True)
class Group:
    """Rows by key: `keys` sorted and distinct, key i's rows `rows[starts[i]:starts[i+1]]`."""

    keys: np.ndarray
    starts: np.ndarray
    rows: np.ndarray

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The rows of those of `keys` present."""
        at = np.searchsorted(self.keys, keys)
        inside = at < len(self.keys)
        at, keys = at[inside], keys[inside]
        at = at[self.keys[at] == keys]
        return self.rows[spans(self.starts[at], self.starts[at + 1])]

    def between(self, low: Any, high: Any) -> tuple[int, int]:
        """The keys k with low <= k < high, as a range of key positions."""
        return int(np.searchsorted(self.keys, low)), int(np.searchsorted(self.keys, high))

    def equal(self, key: Any) -> tuple[int, int]:
        """The key `key` (if present), as a range of key positions."""
        low, high = np.searchsorted(self.keys, key), np.searchsorted(self.keys, key, "right")
        return int(low), int(high)

    def offset(self, start: int, dtype: type[np.signedinteger]) -> Group:
        """The group with `start` added to its rows, as `dtype`."""
        return Group(self.keys, self.starts, self.rows.astype(dtype) + start)


def regroup(keys: np.ndarray, first: np.ndarray, last: np.ndarray, rows: np.ndarray) -> Group:
    """The group of keys (any order, repeats allowed) whose rows are rows[first[i]:last[i]];
    a key's rows keep the order the keys came in (a stable sort)."""
    order = np.argsort(keys, kind="stable")
    keys, first, last = keys[order], first[order], last[order]
    ends = np.concatenate([[0], np.cumsum(last - first)])
    new = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    heads = np.concatenate([[0], new]) if len(keys) else new
    starts = ends[np.concatenate([heads, [len(keys)]])]
    return Group(keys[heads], starts.astype(np.int64), rows[spans(first, last)])


def group(keys: np.ndarray, rows: np.ndarray) -> Group:
    """The group of (keys[i], rows[i]) pairs."""
    first = np.arange(len(keys))
    return regroup(keys, first, first + 1, rows)


def merge(parts: Sequence[Group]) -> Group:
    """One group of the groups of consecutive parts of the rows (rows already offset)."""
    if len(parts) == 1:
        return parts[0]
    bases = np.cumsum([0, *(len(part.rows) for part in parts)])
    first = np.concatenate(
        [part.starts[:-1] + base for part, base in zip(parts, bases[:-1], strict=True)]
    )
    last = np.concatenate(
        [part.starts[1:] + base for part, base in zip(parts, bases[:-1], strict=True)]
    )
    keys = np.concatenate([part.keys for part in parts])
    return regroup(keys, first, last, np.concatenate([part.rows for part in parts]))


@dataclass
class Postings:
    """A field's inverted index: a `Group` per kind of value it holds."""

    groups: dict[str, Group]
    _odd: np.ndarray | None = field(default=None, repr=False)

    def rows_of(self, keys: Sequence[tuple[str, Any]]) -> np.ndarray:
        """The rows holding any of `keys` ((kind, value), as `filters` makes them)."""
        found = [np.zeros(0, np.int64)]
        for kind, group in self.groups.items():
            values = [value for k, value in keys if k == kind]
            if values:
                found.append(group.find(keys_of(kind, values)))
        return np.concatenate(found)

    def under(self, folders: Sequence[str], matches: Callable[[str, str], bool]) -> np.ndarray:
        """The rows whose string value is a folder in or below one of `folders` (each stored
        as `filters.folder_key` writes them, "" the top): the key itself and the range of keys
        starting with it and "/", found by searchsorted. Keys a folder source would not write
        ("/a/", ".") are few: they are tried one by one with `matches(folder, wanted)`."""
        group = self.groups.get("string")
        if group is None:
            return np.zeros(0, np.int64)
        if "" in folders:
            return group.rows
        low, high = [], []
        for wanted in folders:
            for a, b in (
                group.equal(wanted.encode() + END),
                group.between((wanted + "/").encode(), (wanted + "0").encode()),
            ):
                low.append(a)
                high.append(b)
        for i in self.odd():
            folder = group.keys[i][:-1].decode()
            if any(matches(folder, wanted) for wanted in folders):
                low.append(i)
                high.append(i + 1)
        ends = group.starts
        return group.rows[spans(ends[np.array(low, int)], ends[np.array(high, int)])]

    def odd(self) -> np.ndarray:
        """Positions of string keys not written as folders are ("/a", "a/", "."); once."""
        if self._odd is None:
            keys = self.groups["string"].keys
            odd = np.char.startswith(keys, b"/") | np.char.endswith(keys, b"/" + END)
            self._odd = np.flatnonzero(odd | (keys == b"." + END))
        return self._odd


def merge_postings(parts: Sequence[Postings]) -> Postings:
    """One field's postings of the postings of consecutive parts of the rows."""
    kinds = [kind for kind in KINDS if any(kind in part.groups for part in parts)]
    return Postings({k: merge([p.groups[k] for p in parts if k in p.groups]) for k in kinds})


def save(path: Path, columns: dict[str, tuple[Postings, np.ndarray | None]]) -> None:
    """Write fields' postings and float columns (or None) to `path` (`.npz`, through a
    temporary file)."""
    arrays: dict[str, np.ndarray] = {
        "fields": np.array(json.dumps(list(columns))),
        "layout": np.array(LAYOUT),
    }
    for i, (postings, numbers) in enumerate(columns.values()):
        for kind, group in postings.groups.items():
            for part in ("keys", "starts", "rows"):
                arrays[f"f{i}.{kind}.{part}"] = getattr(group, part)
        if numbers is not None:
            arrays[f"n{i}"] = numbers
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, **arrays)  # type: ignore[arg-type]  # the stubs type **kwds as bool
    os.replace(temporary, path)


def load(path: Path, start: int, count: int) -> Iterator[tuple[str, Postings, np.ndarray | None]]:
    """(field, postings with `start` added to their rows as `row_type(count)`, numbers or
    None) of a file `save` wrote, or of the layout before it (no `layout`); none of a layout
    newer than LAYOUT (the columns are then built from the rows)."""
    dtype = row_type(count)
    with np.load(path) as saved:
        layout = int(saved["layout"]) if "layout" in saved.files else 1
        for i, name in enumerate(json.loads(str(saved["fields"])) if layout <= LAYOUT else ()):
            if layout == 1:
                groups = _old_groups(saved, i)
            else:
                groups = {
                    kind: Group(
                        *(saved[f"f{i}.{kind}.{part}"] for part in ("keys", "starts", "rows"))
                    )
                    for kind in KINDS
                    if f"f{i}.{kind}.keys" in saved.files
                }
            postings = Postings({kind: g.offset(start, dtype) for kind, g in groups.items()})
            yield name, postings, saved[f"n{i}"] if f"n{i}" in saved.files else None


def _old_groups(saved: Any, i: int) -> dict[str, Group]:
    """The groups of field i in the first layout: keys [kind, value] as JSON in the order
    first seen, starts, rows (int64)."""
    keys = json.loads(str(saved[f"k{i}"]))
    starts, rows = saved[f"s{i}"], saved[f"r{i}"]
    groups = {}
    for kind in KINDS:
        at = np.array([j for j, key in enumerate(keys) if key[0] == kind], dtype=np.int64)
        if len(at):
            values = keys_of(kind, [keys[j][1] for j in at])
            groups[kind] = regroup(values, starts[at], starts[at + 1], rows)
    return groups
