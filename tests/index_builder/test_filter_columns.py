"""Filter columns as arrays: loaded from segments' saved files (this layout and the one before
it), built from the rows, and a brute-force evaluation over the metadata, on every op."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest

from index_builder.filters import Columns, field_types, folder_key, parse

FOLDERS = [
    "a",
    "a/b",
    "a/bc",
    "a/b-c",
    "a/b.d",
    "a/b0",
    "a/b/c",
    "a/b/c/d",
    "a/bc/d",
    "ab",
    "x",
    "x/a/b",
    "",
    ".",
]
ODD_FOLDERS = ["/a/b/", "a/b/", "/x"]  # not as a folder source writes them: still matched
TEXTS = ["a", "a\0", "b", "é", "日本", "a/b", "1", "true", ""]
NUMBERS = [0, -0.0, 1, 1.0, 2.5, -3, 2**62, 1e300, 7]
SPLITS = (0, 700, 2000, 2400)  # three segments


def _item(rng: random.Random) -> Any:
    return rng.choice([rng.choice(TEXTS), rng.choice(NUMBERS), rng.random() < 0.5])


def _metas(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Random metadata: a folder field, a distinct path, numbers, booleans, lists, a mixed
    field, text with a trailing NUL, and values missing at random."""
    rng = random.Random(seed)
    metas = []
    for i in range(n):
        meta = {
            "folder": rng.choice(FOLDERS + ODD_FOLDERS if rng.random() < 0.1 else FOLDERS),
            "path": f"{FOLDERS[i % len(FOLDERS)]}/p{i}.jpg",
            "n": rng.choice(NUMBERS + [rng.randint(-50, 50)]),
            "ok": rng.random() < 0.3,
            "text": rng.choice(TEXTS),
            "tags": [_item(rng) for _ in range(rng.randint(0, 3))],
            "mixed": _item(rng),
        }
        metas.append({k: v for k, v in meta.items() if rng.random() < 0.85})
    return metas


def _same(value: Any, wanted: Any) -> bool:
    """Equality as filters mean it: 1 and 1.0 match, True and 1 do not."""
    if isinstance(value, bool) or isinstance(wanted, bool):
        return type(value) is type(wanted) and value == wanted
    return (
        type(value) is str
        and type(wanted) is str
        and value == wanted
        or (isinstance(value, int | float) and isinstance(wanted, int | float) and value == wanted)
    )


def _brute(meta: dict[str, Any], name: str, op: str, wanted: Any) -> bool:
    value = meta.get(name)
    items = value if isinstance(value, list) else [value]
    if op == "under":
        if not isinstance(value, str):
            return False
        folder = folder_key(value)
        return any(not w or folder == w or folder.startswith(w + "/") for w in wanted)
    if op in ("eq", "in"):
        return any(_same(i, w) for i in items for w in (wanted if op == "in" else [wanted]))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return {"gt": value > wanted, "gte": value >= wanted, "lt": value < wanted}.get(
        op, value <= wanted
    )


FILTERS = [
    {"folder": ""},
    {"folder": "a"},
    {"folder": "a/b"},  # not a/bc, a/b-c or a/b.d (sorted between a/b and a/b/)
    {"folder": "a/b/c"},
    {"folder": "/a/b/"},
    {"folder": "."},
    {"folder": {"in": ["a/bc", "x", "nowhere"]}},
    {"folder": "a/b/c/d/e"},
    {"path": {"in": [f"{FOLDERS[i % len(FOLDERS)]}/p{i}.jpg" for i in range(0, 2400, 7)]}},
    *({"n": {"eq": v}} for v in NUMBERS),
    {"n": {"in": [1, 2.5, -3, 99]}},
    {"n": {"gt": 0}},
    {"n": {"gte": 1, "lt": 2**62}},
    {"n": {"lte": -0.0}},
    {"ok": True},
    {"ok": {"in": [False]}},
    *({"text": t} for t in TEXTS),
    {"text": {"in": ["a", "é", "zz"]}},
    {"tags": "a\0"},
    {"tags": {"in": [1, True, "1"]}},
    {"tags": 0},
    {"mixed": True},
    {"mixed": 1.0},
    {"mixed": {"in": ["true", 0, False, "日本"]}},
    {"mixed": {"gt": 1}},
    {"mixed": {"lt": 2.5}, "ok": False},
]


class Unread(list):
    """Rows that fail when read: loaded columns need no pass over them."""

    def __iter__(self):
        raise AssertionError("the rows were read")

    def __getitem__(self, index):
        raise AssertionError("the rows were read")


def _save_old(path, metas, fields):
    """A columns file in the layout before the arrays (index_builder/filters.py at main
    224b54b, `Columns.save`): keys as JSON in first-seen order, starts, int64 rows."""
    arrays = {"fields": np.array(json.dumps(list(fields)))}
    for i, name in enumerate(fields):
        postings: dict[tuple[str, Any], list[int]] = {}
        numbers = np.full(len(metas), np.nan)
        for row, meta in enumerate(metas):
            value = meta.get(name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bool):
                    postings.setdefault(("bool", item), []).append(row)
                elif isinstance(item, int | float):
                    postings.setdefault(("number", float(item)), []).append(row)
                elif isinstance(item, str):
                    postings.setdefault(("string", item), []).append(row)
            if isinstance(value, int | float) and not isinstance(value, bool):
                numbers[row] = float(value)
        arrays[f"k{i}"] = np.array(json.dumps([list(key) for key in postings]))
        arrays[f"s{i}"] = np.cumsum([0, *(len(rows) for rows in postings.values())])
        arrays[f"r{i}"] = np.array([r for rows in postings.values() for r in rows], np.int64)
        if fields[name] in ("number", "mixed"):
            arrays[f"n{i}"] = numbers
    np.savez(path, **arrays)  # type: ignore[arg-type]  # the stubs type **kwds as bool


@pytest.fixture(scope="module")
def metas():
    return _metas(SPLITS[-1])


def _loaded(tmp_path, metas, layouts):
    """Columns loaded from a file a segment, each saved in its layout ("new" or "old")."""
    fields, saved = field_types(metas), []
    for i, layout in enumerate(layouts):
        part, path = metas[SPLITS[i] : SPLITS[i + 1]], tmp_path / f"s{i}.columns.npz"
        if layout == "new":
            Columns(part).save(path, fields)
        else:
            _save_old(path, part, fields)
        saved.append((path, len(part)))
    columns = Columns(Unread(metas))
    columns.load(saved)
    return columns


@pytest.mark.parametrize("layouts", [("new",) * 3, ("old",) * 3, ("old", "new", "new")])
def test_columns_loaded_built_and_brute_force_agree(tmp_path, metas, layouts):
    """Every op, on columns loaded from three segments' files (each layout, and a version
    written before the arrays then changed after), equals the columns built from the rows
    and a loop over the metadata."""
    fields = field_types(metas)
    assert fields == {
        "folder": "string",
        "mixed": "mixed",
        "n": "number",
        "ok": "bool",
        "path": "string",
        "tags": "list",
        "text": "string",
    }
    loaded, built = _loaded(tmp_path, metas, layouts), Columns(metas)
    path = next(m["path"] for m in metas[SPLITS[2] :] if "path" in m)
    for filter in [*FILTERS, {"path": path}]:
        clauses = parse(filter, fields)
        brute = [all(_brute(m, *clause) for clause in clauses) for m in metas]
        assert any(brute) or filter in ({"folder": "a/b/c/d/e"},), filter
        assert built.mask(clauses).tolist() == brute, filter
        assert loaded.mask(clauses).tolist() == brute, filter


def test_loaded_columns_equal_built_ones(tmp_path, metas):
    """Merged segments hold the same arrays as one build over all rows."""
    built = Columns(metas)
    for layouts in (("new",) * 3, ("old",) * 3):
        loaded = _loaded(tmp_path, metas, layouts)
        for name in field_types(metas):
            groups = loaded.inverted(name).groups
            assert groups.keys() == built.inverted(name).groups.keys()
            for kind, group in groups.items():
                for part in ("keys", "starts", "rows"):
                    want = getattr(built.inverted(name).groups[kind], part)
                    np.testing.assert_array_equal(getattr(group, part), want)
        np.testing.assert_array_equal(loaded.numbers("n"), built.numbers("n"))


def test_a_newer_layout_is_built_from_the_rows(tmp_path, metas):
    """A file of a layout this code does not know gives no columns: they are built from the
    rows on first use, and answer as before."""
    path, fields = tmp_path / "s.columns.npz", field_types(metas)
    Columns(metas).save(path, fields)
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    np.savez(path, **{**arrays, "layout": np.array(99)})
    columns = Columns(metas)
    columns.load([(path, len(metas))])
    columns.metas = Unread(metas)
    with pytest.raises(AssertionError, match="the rows were read"):
        columns.mask(parse({"text": "a"}, fields))
    columns.metas = metas
    assert columns.mask(parse({"folder": "a/b"}, fields)).tolist() == [
        _brute(m, "folder", "under", ["a/b"]) for m in metas
    ]
