"""Metadata filters: the field types of a side, filter validation and row masks.

A filter is a JSON object whose keys are metadata fields, ANDed:

    {"kind": "cat"}                         equality (on a list field: the list contains it)
    {"kind": {"in": ["cat", "dog"]}}        one of several values
    {"folder": "2023"}                      the folder field: "2023" and every folder under it
                                            ("2023/italy", ...); "" is the top, so everything
    {"year": {"gte": 2000, "lt": 2010}}     numeric range (gt, gte, lt, lte; combinable)
    {"year": {"eq": 2004}}                  equality, spelled out

Fields and their types come from the rows at build time (`field_types`) and are stored with
the index, so a filter on an unknown field, or a range on a text field, is refused before
any search runs. Masks come from per-field columns loaded (or built once) per version: an
inverted index as arrays (`postings`: sorted keys, searched) for equality, `in` and folders,
a float array (NaN where absent) for ranges.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from index_builder import postings
from index_builder.postings import Postings

RANGE_OPS = ("gt", "gte", "lt", "lte")
OPS = ("eq", "in", *RANGE_OPS)
MAX_IN = 1024
# What a version stores and filters on: integers are int64 (Milvus' and numpy's; a larger one
# once overflowed the float column and took the service down), floats finite, text valid
# UTF-8, nesting bounded.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 32
# The field a folder source gives each file (its folder, relative, "/"-separated): people filter
# by a folder and mean everything under it, so equality on it (a string field) becomes UNDER.
FOLDER = "folder"
UNDER = "under"  # parsed op only: value is a list of folders, each matching itself and below


class FilterError(ValueError):
    """A filter that cannot be applied to this index side (unknown field, wrong type...)."""


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "mixed"


def field_types(metas: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Field name -> "string" | "number" | "bool" | "list" | "mixed" over all rows' metadata
    (None values are ignored; a field with two kinds of values is "mixed")."""
    kinds: dict[str, str] = {}
    for meta in metas:
        for name, value in meta.items():
            if value is None:
                continue
            kind = _kind(value)
            kinds[name] = kind if kinds.get(name, kind) == kind else "mixed"
    return dict(sorted(kinds.items()))


def merge_field_types(old: dict[str, str], new: dict[str, str]) -> dict[str, str]:
    """Field kinds of two sets of rows together (`field_types`' rule: a field with two kinds
    is "mixed"), sorted by name."""
    kinds = {**old}
    for name, kind in new.items():
        kinds[name] = kind if kinds.get(name, kind) == kind else "mixed"
    return dict(sorted(kinds.items()))


def _number(value: Any) -> TypeGuard[int | float]:
    """A number a version can store and compare: an int64, or a finite float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, int):
        return INT64_MIN <= value <= INT64_MAX
    return math.isfinite(value)


def _text(value: str) -> bool:
    """Text that UTF-8 can encode (JSON's escapes can spell a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _scalar(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, str) and _text(value)) or _number(value)


def show(value: Any, limit: int = 40) -> str:
    """`repr(value)` cut to `limit` characters (a 400-digit integer stays readable)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**limit:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_value(name: str, kind: str, value: Any) -> None:
    where = f"filter on {show(name)}"
    if not _scalar(value):
        raise FilterError(
            f"{where}: expected a string, a number (int64 or finite) or a boolean, "
            f"got {show(value)}"
        )
    if kind in ("mixed", "list"):
        return
    if _kind(value) != kind:
        raise FilterError(
            f"{where}: the field holds {kind} values, got {_kind(value)} {show(value)}"
        )


def check_storable(value: Any, where: str, depth: int = 0) -> None:
    """Refuse (ValueError naming the field, e.g. `texts[0].meta.n`) a value a version cannot
    store or filter on: an integer outside int64, NaN or an infinity, text with a lone
    surrogate, a key that is not text, or nesting deeper than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int | float):
        if not _number(value):
            raise ValueError(
                f"{where}: {show(value)} cannot be stored (numbers must be int64 integers or "
                "finite floats)"
            )
    elif isinstance(value, str):
        if not _text(value):
            raise ValueError(f"{where}: not valid Unicode (a lone surrogate)")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not _text(key):
                raise ValueError(f"{where}: a key is not valid Unicode text ({show(key)})")
            check_storable(item, f"{where}.{key[:40]}", depth + 1)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_storable(item, f"{where}[{i}]", depth + 1)
    else:
        raise ValueError(f"{where}: {type(value).__name__} is not a JSON value")


def parse(filter: Any, fields: dict[str, str]) -> list[tuple[str, str, Any]]:
    """Validate a filter against a side's field types -> [(field, op, value)]."""
    if filter is None:
        return []
    if not isinstance(filter, dict):
        raise FilterError(f"a filter must be a JSON object of fields, got {type(filter).__name__}")
    clauses = []
    for name, spec in filter.items():
        if name not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise FilterError(f"unknown filter field {show(name)} (fields: {known[:200]})")
        kind = fields[name]
        ops = spec if isinstance(spec, dict) else {"eq": spec}
        if not ops:
            raise FilterError(f"filter on {show(name)}: no condition given")
        for op, value in ops.items():
            clauses.append(_clause(name, kind, op, value))
    if fields.get(FOLDER) == "string":
        clauses = [_under(clause) if clause[0] == FOLDER else clause for clause in clauses]
    return clauses


def _under(clause: tuple[str, str, Any]) -> tuple[str, str, Any]:
    name, op, value = clause
    if op not in ("eq", "in"):
        return clause
    values = value if op == "in" else [value]
    return name, UNDER, [folder_key(v) for v in values]


def folder_key(value: str) -> str:
    """A folder as stored: "/"-separated, no leading or trailing "/", "" (older indexes: ".")
    for the top."""
    value = value.strip("/")
    return "" if value == "." else value


def in_folder(folder: str, wanted: str) -> bool:
    """`folder` is `wanted` or below it (any folder is below the top, "")."""
    folder = folder_key(folder)
    return not wanted or folder == wanted or folder.startswith(wanted + "/")


def _clause(name: str, kind: str, op: str, value: Any) -> tuple[str, str, Any]:
    where = f"filter on {show(name)}"
    if op not in OPS:
        raise FilterError(f"{where}: unknown operator {show(op)} (use {', '.join(OPS)})")
    if op in RANGE_OPS:
        if kind not in ("number", "mixed") or isinstance(value, bool):
            raise FilterError(f"{where}: {op} needs a number field and a number value")
        if not _number(value):
            raise FilterError(
                f"{where}: {op} needs a finite number (an integer within int64), got {show(value)}"
            )
        return name, op, float(value)
    if op == "in":
        if not isinstance(value, list) or not value:
            raise FilterError(f"{where}: 'in' needs a non-empty list")
        if len(value) > MAX_IN:
            raise FilterError(f"{where}: 'in' takes at most {MAX_IN} values")
        for item in value:
            _check_value(name, kind, item)
        return name, op, value
    _check_value(name, kind, value)
    return name, op, value


def _key(value: Any) -> tuple[str, Any]:
    """Inverted-index key: 1 and 1.0 match, True and 1 do not."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", float(value))
    return ("string", value)


class Columns:
    """Per-field lookups over one side's rows, built on first use of each field (one pass over
    `metas`, which may be read lazily from the rows)."""

    def __init__(self, metas: Sequence[dict[str, Any]]) -> None:
        self.metas = metas
        self._inverted: dict[str, Postings] = {}
        self._numbers: dict[str, np.ndarray] = {}

    def inverted(self, name: str) -> Postings:
        if name not in self._inverted:
            self.build({name: "string"})
        return self._inverted[name]

    def numbers(self, name: str) -> np.ndarray:
        if name not in self._numbers:
            self.build({name: "number"})
        return self._numbers[name]

    def build(self, fields: dict[str, str]) -> None:
        """The columns of `fields` (name -> type, as `field_types` records) in one pass over
        the metadata: the inverted index of each, and the float array of each number (or
        mixed) field. A service builds them all when it loads a version, so that no request
        waits for a pass over a million rows."""
        names = [name for name in fields if name not in self._inverted]
        numeric = [n for n in fields if fields[n] in ("number", "mixed") and n not in self._numbers]
        if not names and not numeric:  # nothing to build: no pass over the rows
            return
        # field -> kind -> (keys, rows), a pair per value found
        pairs: dict[str, dict[str, tuple[list[Any], list[int]]]] = {
            name: {kind: ([], []) for kind in postings.KINDS} for name in names
        }
        numbers = {name: np.full(len(self.metas), np.nan) for name in numeric}
        for row, meta in enumerate(self.metas):
            for name in names:
                value = meta.get(name)
                for item in value if isinstance(value, list) else [value]:
                    if _scalar(item):
                        kind, key = _key(item)
                        found = pairs[name][kind]
                        found[0].append(key)
                        found[1].append(row)
            for name in numeric:
                value = meta.get(name)
                if _number(value):  # a value no version should hold is no match
                    numbers[name][row] = float(value)
        dtype = postings.row_type(len(self.metas))
        for name, kinds in pairs.items():
            self._inverted[name] = Postings(
                {
                    kind: postings.group(postings.keys_of(kind, keys), np.array(rows, dtype))
                    for kind, (keys, rows) in kinds.items()
                    if keys
                }
            )
        self._numbers.update(numbers)

    def save(self, path: Path, fields: dict[str, str]) -> None:
        """Build the columns of `fields` and write them to `path` (`postings.save`: per field
        its postings as arrays, and for a number or mixed field its values)."""
        self.build(fields)
        postings.save(
            path, {name: (self._inverted[name], self._numbers.get(name)) for name in fields}
        )

    def load(self, saved: Sequence[tuple[Path | None, int]]) -> None:
        """Take the columns saved (`save`) for consecutive parts of the rows, given as (file or
        None, rows in the part): a field's column is taken when every part saved it, else
        built on first use as before (a version written without them, or a field new since)."""
        found: dict[str, list[Postings]] = {}
        numbers: dict[str, list[np.ndarray]] = {}
        start, total = 0, sum(count for _, count in saved)
        for path, count in saved:
            for name, part, values in postings.load(path, start, total) if path else ():
                found.setdefault(name, []).append(part)
                if values is not None:
                    numbers.setdefault(name, []).append(values)
            start += count
        for name, parts in found.items():
            if len(parts) == len(saved) and name not in self._inverted:
                self._inverted[name] = postings.merge_postings(parts)
        for name, columns in numbers.items():
            if len(columns) == len(saved) and name not in self._numbers:
                self._numbers[name] = np.concatenate(columns)

    def mask(self, clauses: list[tuple[str, str, Any]]) -> np.ndarray:
        """Rows satisfying every clause."""
        mask = np.ones(len(self.metas), dtype=bool)
        for name, op, value in clauses:
            mask &= self._clause_mask(name, op, value)
        return mask

    def _clause_mask(self, name: str, op: str, value: Any) -> np.ndarray:
        if op in RANGE_OPS:
            numbers = self.numbers(name)
            with np.errstate(invalid="ignore"):
                compare = {"gt": np.greater, "gte": np.greater_equal, "lt": np.less}
                return compare.get(op, np.less_equal)(numbers, value)
        mask = np.zeros(len(self.metas), dtype=bool)
        if op == UNDER:  # key ranges of the sorted folders, not a pass over them
            mask[self.inverted(name).under(value, in_folder)] = True
        else:
            mask[
                self.inverted(name).rows_of([_key(v) for v in (value if op == "in" else [value])])
            ] = True
        return mask
