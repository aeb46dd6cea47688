"""Filters as Milvus expressions select exactly the rows our own masks select (milvus-lite)."""

from __future__ import annotations

import numpy as np
import pytest

from index_builder.backends import BackendConfig, open_store
from index_builder.backends.base import IndexOptions
from index_builder.backends.milvus.expr import clause, literal
from index_builder.filters import Columns, field_types, parse

DIM = 8
NAMES = ["cat", "dog", 'say "hi"', "back\\slash", "é ü"]
FOLDERS = ["", "2023", "2023/italy", "2023/italy/rome", "2023x", "20234/a", 'q"t/x', "é/ü"]


def _meta(rng, i):
    meta = {
        "s": str(rng.choice(NAMES)),
        "n": int(rng.integers(0, 20)) if i % 3 else float(rng.integers(0, 20)) + 0.5,
        "b": bool(rng.integers(0, 2)),
        "tags": [str(t) for t in rng.choice(NAMES, int(rng.integers(0, 3)), replace=False)],
        "nums": [int(x) for x in rng.integers(0, 5, 2)],
        "mix": [str(rng.choice(NAMES)), 3] if i % 4 == 0 else (7 if i % 4 == 1 else "cat"),
        'odd "name"': int(rng.integers(0, 3)),
        "folder": FOLDERS[i % len(FOLDERS)],
    }
    drop = ["s", "n", "b", "tags", "mix"][i % 7] if i % 7 < 5 else None
    if drop:
        del meta[drop]  # rows without the field match no clause on it
    if i % 11 == 0:
        meta["n"] = None
    return meta


FILTERS = [
    {"s": "cat"},
    {"s": 'say "hi"'},
    {"s": {"in": ["back\\slash", "é ü", "nobody"]}},
    {"n": 4},
    {"n": {"eq": 4.0}},
    {"n": {"gte": 5, "lt": 12.5}},
    {"n": {"gt": 3.5}, "s": {"in": ["dog", "cat"]}},
    {"n": {"lte": 0}},
    {"b": True},
    {"b": {"in": [False]}},
    {"tags": "dog"},
    {"tags": {"in": ["cat", 'say "hi"']}},
    {"nums": 3},
    {"nums": {"in": [0, 4]}},
    {"mix": "cat"},
    {"mix": 3},
    {"mix": {"in": [7, "dog"]}},
    {"mix": {"gte": 5}},
    {'odd "name"': 2},
    {"s": "cat", "tags": "cat", "b": False},
    {"folder": "2023"},
    {"folder": "2023/italy/"},
    {"folder": {"in": ["2023/italy", 'q"t']}},
    {"folder": ""},
    {"folder": "é", "s": "cat"},
    {"folder": {"in": ["20234", "2023x"]}},
]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("expr")
    rng = np.random.default_rng(0)
    n = 400
    metas = [_meta(rng, i) for i in range(n)]
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [{"id": f"i{i}", "image": f"/g/{i}.png", "meta": metas[i]} for i in range(n)]
    config = BackendConfig("milvus", milvus_uri=str(tmp / "m.db"))
    store = open_store(tmp / "work", config)
    store.publish(
        bundle_id="b", dim=DIM, shards={"image": [vectors]}, rows={"image": rows},
        options=IndexOptions(queries=20), dataset={},
    )  # fmt: skip
    return store.open(), metas, vectors


@pytest.mark.parametrize("filter", FILTERS, ids=[str(f) for f in FILTERS])
def test_expression_selects_the_rows_of_the_mask(gallery, filter):
    loaded, metas, vectors = gallery
    fields = field_types(metas)
    assert loaded.info["sides"]["image"]["fields"] == fields
    mask = Columns(metas).mask(parse(filter, fields))
    _, found = loaded.search("image", vectors[:1], len(metas), filter=filter)
    ids = {item["id"] for item in loaded.rows_at("image", found[0][found[0] >= 0])}
    assert ids == {f"i{i}" for i in np.flatnonzero(mask)}


def test_literals_and_clauses():
    assert literal(True) == "true" and literal(3) == "3" and literal(2.0) == "2"
    assert literal(1e-7) == "0.0000001" and literal('a"b') == '"a\\"b"'
    assert clause("f", "string", "in", ["a", "b"]) == '(meta["f"] == "a" or meta["f"] == "b")'
    assert clause("t", "list", "eq", "a") == 'json_contains(meta["t"], "a")'
    assert clause("t", "list", "in", ["a", 1]) == 'json_contains_any(meta["t"], ["a", 1])'
    assert clause("m", "mixed", "eq", 1) == '(meta["m"] == 1 or json_contains(meta["m"], 1))'
    assert clause("y", "number", "gte", 2000.0) == 'meta["y"] >= 2000'
