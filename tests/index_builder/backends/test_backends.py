"""The backend-independent suite: every test runs on FAISS files and on a real Milvus server
(the session's `milvus_server`, one fresh database per test), checked against exact search and
against each other."""

from __future__ import annotations

import time

import numpy as np
import pytest

from index_builder import collection
from index_builder.backends import BackendConfig, open_store
from index_builder.backends.base import IndexOptions
from index_builder.backends.milvus.version import REFRESH_S
from index_builder.filters import FilterError
from index_builder.search import Searcher

DIM = 16
BACKENDS = ["faiss", "milvus"]


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _items(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((8, DIM)))
    images = _unit(centres[rng.integers(0, 8, n)] + 0.4 * rng.standard_normal((n, DIM)))
    texts = _unit(images + 0.3 * rng.standard_normal((n, DIM)))
    rows = {
        "image": [
            {"id": f"i{i}", "image": f"/g/{i}.png", "captions": [f"c{i}"],
             "meta": {"group": f"g{i % 10}", "n": i, "tags": ["odd" if i % 2 else "even"]}}
            for i in range(n)
        ],
        "text": [
            {"id": f"i{i}#0", "image_id": f"i{i}", "text": f"c{i}", "meta": {"n": i}}
            for i in range(n)
        ],
    }  # fmt: skip
    return {"image": images, "text": texts}, rows


def make_store(tmp_path, backend, uri=None, **config):
    if backend == "faiss":
        return open_store(tmp_path / "idx")
    return open_store(tmp_path / "work", BackendConfig("milvus", milvus_uri=uri, **config))


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    uri = request.getfixturevalue("milvus_uri") if request.param == "milvus" else None
    return make_store(tmp_path, request.param, uri)


def _publish(store, n=300, sides=("image", "text"), bundle_id="b1", seed=0):
    vectors, rows = _items(n, seed)
    factory = "Flat" if store.__class__.__name__ == "IndexStore" else None
    version = store.publish(
        bundle_id=bundle_id,
        dim=DIM,
        shards={side: [vectors[side]] for side in sides},
        rows={side: rows[side] for side in sides},
        options=IndexOptions(factory=factory, queries=100, target_recall=0.99),
        dataset={"name": "synthetic"},
    )
    return version, vectors, rows


def _exact(base, queries, allowed, k):
    """Brute force over the allowed rows: the top k row numbers per query."""
    rows = np.flatnonzero(allowed)
    scores = queries @ base[rows].T
    return [rows[np.argsort(-s, kind="stable")[:k]].tolist() for s in scores]


class FakeBundle:
    def __init__(self, bundle_id="b1", embed_dim=DIM):
        self.bundle_id, self.embed_dim = bundle_id, embed_dim


class FakeEncoders:
    bundle = FakeBundle()


def _ids(loaded, side, rows):
    return [item["id"] for item in loaded.rows_at(side, [r for r in rows if r >= 0])]


def test_search_and_filters_match_exact_search(store):
    _, vectors, rows = _publish(store)
    loaded = store.open(bundle=FakeBundle())
    assert loaded.sides == ("image", "text") and loaded.live_count("image") == 300
    assert loaded.info["sides"]["image"]["recall_at_10"] == 1.0
    queries = vectors["text"][:20]
    metas = [row["meta"] for row in rows["image"]]
    for filter, wanted in [
        (None, lambda m: True),
        ({"group": "g3"}, lambda m: m["group"] == "g3"),
        ({"n": {"gte": 50, "lt": 120}}, lambda m: 50 <= m["n"] < 120),
        ({"group": {"in": ["g1", "g4"]}, "tags": "odd"}, lambda m: m["group"] == "g1"),
        ({"tags": {"in": ["even", "none"]}}, lambda m: m["n"] % 2 == 0),
    ]:
        allowed = np.array([wanted(m) for m in metas])
        assert loaded.count("image", filter) == allowed.sum()
        scores, found = loaded.search("image", queries, 10, filter=filter)
        truth = _exact(vectors["image"], queries, allowed, 10)
        for q in range(len(queries)):
            assert _ids(loaded, "image", found[q]) == [f"i{r}" for r in truth[q]], filter
            np.testing.assert_allclose(
                scores[q], queries[q] @ vectors["image"][truth[q]].T, atol=1e-5
            )


def test_find_returns_each_hit_with_its_row_read_by_the_search(store, monkeypatch):
    """`find` is `search`'s ranking from offset+1, each hit carrying the record `rows_at`
    gives, with no lookup of a hit's row after the search (FAISS: one batched read of the
    page's rows; Milvus: the search call's output fields, no read at all)."""
    _, vectors, _ = _publish(store)
    loaded = store.open(bundle=FakeBundle())
    queries = vectors["text"][:6]
    for filter, offset in ((None, 0), ({"n": {"lt": 150}}, 3)):
        scores, rows = loaded.search("image", queries, 8 + offset, filter=filter)
        expected = [
            [(int(r), loaded.rows_at("image", [r])[0]) for r in qr[offset:] if r >= 0]
            for qr in rows
        ]
        reads: list[list[int]] = []
        rows_at = loaded.rows_at

        def counted(side, wanted, rows_at=rows_at, reads=reads):
            reads.append(list(wanted))
            return rows_at(side, wanted)

        monkeypatch.setattr(loaded, "rows_at", counted)
        monkeypatch.setattr(loaded, "row_of", None)  # never called
        found = loaded.find("image", queries, 8, offset=offset, filter=filter)
        monkeypatch.undo()
        assert [[(h.row, h.item) for h in q] for q in found] == expected
        assert [[h.rank for h in q] for q in found] == [
            list(range(offset + 1, offset + 9)) for _ in queries
        ]
        for q, hits in enumerate(found):
            np.testing.assert_allclose([h.score for h in hits], scores[q, offset:], atol=1e-6)
        page_rows = sorted({h.row for q in found for h in q})
        assert reads == ([page_rows] if store.__class__.__name__ == "IndexStore" else [])
    with pytest.raises(ValueError, match="offset"):
        loaded.find("image", queries, 8, offset=-1)


def test_both_backends_give_the_same_hits(tmp_path, milvus_uri):
    searchers = []
    for backend in BACKENDS:
        store = make_store(tmp_path / backend, backend, milvus_uri)
        _, vectors, _ = _publish(store)
        searchers.append(Searcher(store.open(), FakeEncoders()))  # type: ignore[arg-type]
    for side, queries in (("image", vectors["text"][:5]), ("text", vectors["image"][:5])):
        for filter in (None, {"n": {"lt": 100}}):
            a, b = (s.search(side, queries, k=7, offset=2, filter=filter) for s in searchers)
            assert [[h["id"] for h in q] for q in a] == [[h["id"] for h in q] for q in b]
            for hits_a, hits_b in zip(a, b, strict=True):
                for x, y in zip(hits_a, hits_b, strict=True):
                    assert x.pop("score") == pytest.approx(y.pop("score"), abs=1e-5)
                    assert x == y
    a, b = (s.similar("image", "i4", k=5) for s in searchers)
    assert [h["id"] for h in a] == [h["id"] for h in b] and "i4" not in [h["id"] for h in a]
    assert searchers[1].image_path("i4").name == "4.png"


def test_add_upsert_and_delete(store):
    first, vectors, rows = _publish(store, n=100)
    before = store.open()
    result = collection.delete_ids(store, ["i5", "i7#0"])
    assert result.deleted == {"image": 1, "text": 2}  # i5's caption went with it
    loaded = store.open()
    assert loaded.version == result.version == store.current()
    if store.in_place:  # Milvus: the rows change in the version's collection, logged
        assert result.version == first and loaded.info["changes"] == 1
        [entry] = store.changes()
        assert entry["state"] == "done" and entry["deleted"] == {"image": 1, "text": 2}
    else:  # FAISS: a new version, its parent the one changed
        assert loaded.info["parent"] == first
    assert loaded.row_of("image", "i5") is None and loaded.row_of("text", "i5#0") is None
    assert loaded.live_count("image") == 99 and loaded.live_count("text") == 98
    assert loaded.count("image", {"group": "g5"}) == 9
    _, found = loaded.search("image", vectors["image"][5:6], 100)
    assert "i5" not in _ids(loaded, "image", found[0]) and (found[0] >= 0).sum() == 99
    if store.in_place:  # a reader opened before sees the change too, within REFRESH_S
        time.sleep(REFRESH_S)
        assert before.count("image") == 99
    else:
        assert before.count("image") == 100
    _, found = before.search("image", vectors["image"][5:6], 1)  # FAISS: untouched
    assert (_ids(before, "image", found[0]) == ["i5"]) != store.in_place

    # upsert i9 with i5's old vector and a new caption; add i100
    change = collection.Change(
        rows={"image": [{**rows["image"][9], "captions": ["new"]},
                        {**rows["image"][1], "id": "i100", "meta": {"group": "new"}}],
              "text": [{"id": "i9#0", "image_id": "i9", "text": "new", "meta": {}}]},
        vectors={"image": vectors["image"][[5, 1]], "text": vectors["text"][5:6]},
        upsert=True,
    )  # fmt: skip
    result = collection.change(store, store.open(), change)
    assert result.replaced == {"image": 1, "text": 1} and result.added["image"] == 1
    loaded = store.open()
    _, found = loaded.search("image", vectors["image"][5:6], 1)
    [hit] = loaded.rows_at("image", found[0])
    assert hit["id"] == "i9" and hit["captions"] == ["new"]
    _, found = loaded.search("image", vectors["image"][9:10], 100)
    assert _ids(loaded, "image", found[0]).count("i9") == 1  # the old row is gone
    _, found = loaded.search("text", vectors["image"][5:6], 1)
    assert _ids(loaded, "text", found[0]) == ["i9#0"]
    _, found = loaded.search("image", vectors["image"][1:2], 5, filter={"group": "new"})
    assert _ids(loaded, "image", found[0]) == ["i100"]
    assert loaded.info["sides"]["image"]["fields"]["group"] == "string"
    again = collection.change(store, loaded, collection.Change(rows=change.rows,
                              vectors=change.vectors))  # fmt: skip
    assert again.version == loaded.version and again.skipped_existing["image"] == 2

    with pytest.raises(KeyError, match="1 ids are not in the index, e.g. 'nope'"):
        collection.delete_ids(store, ["i1", "nope"])
    assert store.current() == result.version


def test_one_sided_version_then_the_other_side(store):
    _, vectors, rows = _publish(store, n=50, sides=("image",))
    loaded = store.open()
    assert loaded.sides == ("image",) and not loaded.has("text")
    assert loaded.info["sides"]["image"]["query_side"] == "image"
    with pytest.raises(LookupError, match="has no text side"):
        loaded.search("text", vectors["image"][:1], 3)
    change = collection.Change(
        rows={"text": rows["text"][:20]}, vectors={"text": vectors["text"][:20]}
    )
    assert collection.change(store, loaded, change).added == {"image": 0, "text": 20}
    loaded = store.open()
    assert loaded.sides == ("image", "text") and loaded.live_count("text") == 20
    _, found = loaded.search("text", vectors["text"][3:4], 1)
    assert _ids(loaded, "text", found[0]) == ["i3#0"]
    np.testing.assert_allclose(loaded.vector("text", found[0][0]), vectors["text"][3], atol=1e-6)


def test_switch_rolls_back_and_bundles_are_checked(store):
    first, _, _ = _publish(store, n=40)
    second, _, _ = _publish(store, n=40, bundle_id="b2", seed=1)
    assert store.versions() == [first, second] and store.current() == second
    with pytest.raises(ValueError, match="built with bundle b2, not b1"):
        store.open(bundle=FakeBundle("b1"))
    with pytest.raises(ValueError, match="embeds in 32 dimensions but index version"):
        store.open(bundle=FakeBundle("b2", embed_dim=32))
    store.switch(first)
    assert store.current() == first and store.open(bundle=FakeBundle("b1")).version == first
    assert store.read_info(second)["bundle_id"] == "b2"
    with pytest.raises(FileNotFoundError, match="index version v999999-20000101T000000Z not"):
        store.switch("v999999-20000101T000000Z")
    with pytest.raises((ValueError, FileNotFoundError)):
        store.switch("../elsewhere")
    assert store.current() == first


def test_bad_queries_and_filters_are_refused(store):
    _publish(store, n=30)
    loaded = store.open()
    with pytest.raises(ValueError, match=r"shape \(Q, 16\)"):
        loaded.search("image", np.zeros((1, 3), np.float32), 5)
    with pytest.raises(ValueError, match="k must be at least 1"):
        loaded.search("image", np.zeros((1, DIM), np.float32), 0)
    with pytest.raises(FilterError, match="unknown filter field 'colour'"):
        loaded.search("image", np.zeros((1, DIM), np.float32), 5, filter={"colour": "red"})
    _, found = loaded.search("image", np.ones((1, DIM), np.float32), 5, filter={"group": "none"})
    assert found.shape == (1, 0)


def test_emptying_the_index_is_refused(store):
    _publish(store, n=5, sides=("image",))
    with pytest.raises(ValueError, match="leave the index empty"):
        collection.delete_ids(store, [f"i{i}" for i in range(5)])
    assert store.open().live_count("image") == 5 and len(store.versions()) == 1


def test_no_index_yet_is_one_clear_error(store):
    assert store.current() is None and store.versions() == []
    with pytest.raises(FileNotFoundError, match="build one with `cots index build"):
        store.open()
