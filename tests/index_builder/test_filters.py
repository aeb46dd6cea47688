"""Metadata filters: field types, validation errors, masks against a naive evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from index_builder.filters import Columns, FilterError, field_types, parse

METAS = [
    {"folder": "cats", "year": 2001, "tags": ["cute", "small"], "ok": True},
    {"folder": "dogs", "year": 2010.5, "tags": ["big"], "ok": False},
    {"folder": "cats", "year": 1999, "ok": True},
    {"folder": "birds", "tags": ["small"]},
    {},
]
FIELDS = field_types(METAS)


def _mask(filter):
    return Columns(METAS).mask(parse(filter, FIELDS)).tolist()


def test_field_types():
    assert FIELDS == {"folder": "string", "ok": "bool", "tags": "list", "year": "number"}
    assert field_types([{"a": 1}, {"a": "x"}, {"a": None}]) == {"a": "mixed"}


@pytest.mark.parametrize(
    ("filter", "expected"),
    [
        ({"folder": "cats"}, [True, False, True, False, False]),
        ({"folder": {"eq": "dogs"}}, [False, True, False, False, False]),
        ({"folder": {"in": ["dogs", "birds"]}}, [False, True, False, True, False]),
        ({"year": {"gte": 2001}}, [True, True, False, False, False]),
        ({"year": {"gt": 1999, "lt": 2005}}, [True, False, False, False, False]),
        ({"year": {"lte": 2001}, "folder": "cats"}, [True, False, True, False, False]),
        ({"year": 2001}, [True, False, False, False, False]),
        ({"tags": "small"}, [True, False, False, True, False]),
        ({"tags": {"in": ["big", "cute"]}}, [True, True, False, False, False]),
        ({"ok": True}, [True, False, True, False, False]),
        ({"folder": "fish"}, [False] * 5),
    ],
)
def test_masks(filter, expected):
    assert _mask(filter) == expected


FOLDERS = ["", "2023", "2023/italy", "2023/italy/rome", "2023x", "20234/a", "2024/2023", "."]


@pytest.mark.parametrize(
    ("filter", "expected"),
    [
        ({"folder": "2023"}, ["2023", "2023/italy", "2023/italy/rome"]),
        ({"folder": "2023/italy"}, ["2023/italy", "2023/italy/rome"]),
        ({"folder": "/2023/italy/"}, ["2023/italy", "2023/italy/rome"]),
        ({"folder": {"eq": "2023/italy/rome"}}, ["2023/italy/rome"]),
        ({"folder": {"in": ["2023x", "20234"]}}, ["2023x", "20234/a"]),
        ({"folder": "202"}, []),
        ({"folder": ""}, FOLDERS),  # the top holds every folder
        ({"folder": "."}, FOLDERS),
    ],
)
def test_folder_filter_matches_the_folder_and_every_folder_under_it(filter, expected):
    """People filter by a folder and mean everything under it (`2023` finds `2023/italy/...`),
    on whole names only (`2023` is not `2023x`)."""
    metas = [{"folder": folder} for folder in FOLDERS]
    mask = Columns(metas).mask(parse(filter, field_types(metas)))
    assert [folder for folder, keep in zip(FOLDERS, mask, strict=True) if keep] == expected


def test_only_a_string_folder_field_matches_below():
    metas = [{"folder": ["a", "a/b"]}, {"folder": ["a/b"]}]  # a list field: plain containment
    assert Columns(metas).mask(parse({"folder": "a"}, field_types(metas))).tolist() == [True, False]
    assert parse({"tag": "a"}, {"tag": "string"}) == [("tag", "eq", "a")]


def test_masks_match_a_naive_loop_on_random_metadata():
    rng = np.random.default_rng(0)
    metas = [
        {"n": int(rng.integers(0, 50)), "c": str(rng.choice(list("abcde")))} for _ in range(500)
    ]
    columns, fields = Columns(metas), field_types(metas)
    for lo, hi, letters in [(3, 17, ["a"]), (0, 49, ["b", "e"]), (40, 45, ["c", "d", "a"])]:
        filter = {"n": {"gte": lo, "lt": hi}, "c": {"in": letters}}
        naive = [lo <= m["n"] < hi and m["c"] in letters for m in metas]
        assert columns.mask(parse(filter, fields)).tolist() == naive


def test_columns_built_in_one_pass_equal_those_built_per_field():
    rng = np.random.default_rng(1)
    metas = [
        {"n": int(rng.integers(0, 9)), "c": str(rng.choice(list("abc"))), "t": ["x", "y"][: i % 3]}
        for i in range(300)
    ]
    metas[7] = {"n": 2.5, "c": True}  # mixed kinds and absent fields
    fields = field_types(metas)
    lazy, built = Columns(metas), Columns(metas)
    built.build(fields)
    for filter in ({"n": {"gt": 2, "lte": 6}}, {"c": {"in": ["a", True]}}, {"t": "y", "n": 2.5}):
        clauses = parse(filter, fields)
        assert built.mask(clauses).tolist() == lazy.mask(clauses).tolist()
    for name in fields:
        groups, lazy_groups = built.inverted(name).groups, lazy.inverted(name).groups
        assert groups.keys() == lazy_groups.keys()
        for kind, group in groups.items():
            for part in ("keys", "starts", "rows"):
                np.testing.assert_array_equal(
                    getattr(group, part), getattr(lazy_groups[kind], part)
                )
    np.testing.assert_array_equal(built.numbers("n"), lazy.numbers("n"))


@pytest.mark.parametrize(
    ("filter", "message"),
    [
        ({"colour": "red"}, "unknown filter field 'colour'"),
        ({"folder": {"gt": 3}}, "gt needs a number field"),
        ({"year": "recent"}, "the field holds number values, got string"),
        ({"year": {"gte": "x"}}, "gte needs a finite number"),
        ({"folder": {"like": "c%"}}, "unknown operator 'like'"),
        ({"folder": {"in": []}}, "'in' needs a non-empty list"),
        ({"folder": {"in": "cats"}}, "'in' needs a non-empty list"),
        ({"folder": {}}, "no condition given"),
        ({"folder": {"nested": 1}}, "unknown operator"),
        ({"folder": ["cats"]}, "expected a string, a number"),
        (["folder"], "must be a JSON object"),
        ({"year": {"lt": float("nan")}}, "finite number"),
    ],
)
def test_bad_filters_are_refused(filter, message):
    with pytest.raises(FilterError, match=message):
        parse(filter, FIELDS)


def test_no_filter():
    assert parse(None, FIELDS) == [] and parse({}, FIELDS) == []
