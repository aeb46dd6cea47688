"""The live collection and filtered search, checked against exact (brute-force) references."""

from __future__ import annotations

import numpy as np
import pytest

from index_builder import collection
from index_builder.backends.base import IndexOptions
from index_builder.backends.faiss.store import IndexStore

DIM = 16


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _items(n, seed=0, prefix="i"):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((8, DIM)))
    images = _unit(centres[rng.integers(0, 8, n)] + 0.4 * rng.standard_normal((n, DIM)))
    texts = _unit(images + 0.3 * rng.standard_normal((n, DIM)))
    rows = {
        "image": [
            {
                "id": f"{prefix}{i}",
                "image": f"/g/{i}.png",
                "captions": [f"c{i}"],
                "meta": {"group": f"g{i % 10}", "n": i},
            }
            for i in range(n)
        ],  # fmt: skip
        "text": [
            {"id": f"{prefix}{i}#0", "image_id": f"{prefix}{i}", "text": f"c{i}", "meta": {"n": i}}
            for i in range(n)
        ],
    }
    return {"image": images, "text": texts}, rows


def _publish(store, n=600, factory="Flat", sides=("image", "text")):
    vectors, rows = _items(n)
    store.publish(
        bundle_id="b1",
        dim=DIM,
        shards={side: [vectors[side]] for side in sides},
        rows={side: rows[side] for side in sides},
        options=IndexOptions(factory=factory, queries=100, target_recall=0.99),
        dataset={},
    )
    return vectors, rows


def _exact(base, queries, allowed, k):
    """Brute force over the allowed rows: ids of the top k per query."""
    rows = np.flatnonzero(allowed)
    scores = queries @ base[rows].T
    return [set(rows[np.argsort(-s, kind="stable")[:k]].tolist()) for s in scores]


def _recall(found, truth):
    return np.mean(
        [len(set(f[f >= 0].tolist()) & t) / len(t) for f, t in zip(found, truth, strict=False)]
    )


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF16,Flat", "IVF16,SQ4"])
@pytest.mark.parametrize("selective", [False, True])
def test_filtered_search_matches_exact_filtered_search(tmp_path, factory, selective, monkeypatch):
    from index_builder.backends.faiss import search

    if not selective:  # force the selector path (the index, not the exact gather)
        monkeypatch.setattr(search, "EXACT_ROWS", 10)
    store = IndexStore(tmp_path / "idx")
    vectors, _ = _publish(store, factory=factory)
    loaded = store.open()
    queries = vectors["text"][:40]
    for filter in ({"group": "g3"}, {"n": {"lt": 300}}, {"group": {"in": ["g1", "g2", "g5"]}}):
        mask = loaded.filter_mask("image", filter)
        _, found = loaded.search("image", queries, 10, mask)
        assert all(mask[r] for r in found[found >= 0])
        assert _recall(found, _exact(vectors["image"], queries, mask, 10)) >= 0.95


def test_compressed_codes_serve_exact_scores_through_changes(tmp_path):
    """An index with compressed codes records its re-rank depth; searches of the version (and
    of the versions changes make from it) return exact scores in exact order."""
    store = IndexStore(tmp_path / "idx")
    vectors, rows = _publish(store, factory="IVF16,SQ4")
    queries = vectors["text"][:40]
    for step in range(2):
        loaded = store.open()
        side = loaded.info["sides"]["image"]
        assert side["search_params"]["rerank"] == 2 and side["recall_at_10"] >= 0.99
        scores, found = loaded.search("image", queries, 10)
        base = loaded.vectors["image"]
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, base[found]), atol=1e-6)
        live = (
            np.ones(len(base), bool)
            if loaded.deleted["image"] is None
            else ~loaded.deleted["image"]
        )
        assert _recall(found, _exact(np.asarray(base), queries, live, 10)) >= 0.95
        if step == 0:
            collection.delete_ids(store, ["i1", "i2"])


def test_delete_upsert_and_add(tmp_path):
    store = IndexStore(tmp_path / "idx")
    vectors, rows = _publish(store, n=100, factory="HNSW16")
    before = store.open()
    result = collection.delete_ids(store, ["i5", "i7#0"])
    assert result.deleted == {"image": 1, "text": 2}  # i5's caption went with it
    loaded = store.open()
    assert loaded.version == result.version and loaded.info["parent"] == before.version
    assert loaded.row_of("image", "i5") is None and loaded.row_of("text", "i5#0") is None
    assert loaded.live_count("image") == 99 and loaded.live_count("text") == 98
    _, found = loaded.search("image", vectors["image"][5:6], 100)
    assert 5 not in found[0] and (found[0] >= 0).sum() == 99
    _, found = before.search("image", vectors["image"][5:6], 1)  # the old version is untouched
    assert found[0, 0] == 5

    # upsert i9 with i5's old vector and a new caption: the search finds i9 there
    change = collection.Change(
        rows={"image": [{**rows["image"][9], "captions": ["new"]}],
              "text": [{"id": "i9#0", "image_id": "i9", "text": "new", "meta": {}}]},
        vectors={"image": vectors["image"][5:6], "text": vectors["text"][5:6]},
        upsert=True,
    )  # fmt: skip
    result = collection.change(store, store.open(), change)
    assert result.replaced == {"image": 1, "text": 1}
    loaded = store.open()
    _, found = loaded.search("image", vectors["image"][5:6], 1)
    assert loaded.images[found[0, 0]]["id"] == "i9" and loaded.images[found[0, 0]]["captions"] == [
        "new"
    ]
    assert sum(row["id"] == "i9" for row in loaded.images) == 2  # the old row is a tombstone
    _, found = loaded.search("image", vectors["image"][9:10], 100)
    assert loaded.row_of("image", "i9") in found[0] and 9 not in found[0]

    with pytest.raises(KeyError, match="1 ids are not in the index, e.g. 'nope'"):
        collection.delete_ids(store, ["i1", "nope"])
    assert store.current() == result.version


def test_heavy_deletion_compacts_to_exact_results(tmp_path):
    store = IndexStore(tmp_path / "idx")
    vectors, _ = _publish(store, n=200, factory="IVF8,Flat")
    gone = [f"i{i}" for i in range(0, 200, 3)]  # a third: over the compaction threshold
    collection.delete_ids(store, gone, side="image")
    loaded = store.open()
    side = loaded.info["sides"]["image"]
    assert side["rows"] == side["count"] == 133 and side["deleted"] == 0
    assert loaded.deleted["image"] is None and loaded.info["sides"]["text"]["count"] == 200
    keep = np.array([i % 3 != 0 for i in range(200)])
    queries = vectors["text"][:30]
    _, found = loaded.search("image", queries, 10)
    ids = np.array([int(row["id"][1:]) for row in loaded.images])
    truth = _exact(vectors["image"], queries, keep, 10)
    assert _recall(ids[found], truth) >= 0.95
    assert side["recall_at_10"] >= 0.95


def test_one_sided_versions_and_adding_the_other_side(tmp_path):
    store = IndexStore(tmp_path / "idx")
    vectors, rows = _publish(store, n=50, sides=("image",))
    loaded = store.open()
    assert loaded.sides == ("image",) and loaded.info["sides"]["image"]["query_side"] == "image"
    with pytest.raises(LookupError, match="has no text side"):
        loaded.search("text", vectors["image"][:1], 3)
    change = collection.Change(
        rows={"text": rows["text"][:20]}, vectors={"text": vectors["text"][:20]}
    )
    result = collection.change(store, loaded, change)
    assert result.added == {"image": 0, "text": 20}
    loaded = store.open()
    assert loaded.sides == ("image", "text") and loaded.live_count("text") == 20
    _, found = loaded.search("text", vectors["text"][3:4], 1)
    assert loaded.texts[found[0, 0]]["id"] == "i3#0"


def test_unchanged_side_is_copied_never_linked(tmp_path):
    """Damage to one version must not reach its rollback target (issue 25)."""
    store = IndexStore(tmp_path / "idx")
    _publish(store, n=50)
    first = store.open()
    collection.delete_ids(store, ["i1#0"], side="text")
    second = store.open()
    for name in ("image.faiss", "images.jsonl", "image.npy"):
        old, new = first.path / name, second.path / name
        assert old.stat().st_ino != new.stat().st_ino and old.stat().st_nlink == 1
        assert old.read_bytes() == new.read_bytes()
    assert second.info["sides"]["image"] == first.info["sides"]["image"]


def test_a_value_no_version_can_store_is_refused_before_anything_is_written(tmp_path):
    store = IndexStore(tmp_path / "idx")
    _publish(store, n=20)
    loaded = store.open()
    versions = store.versions()
    for bad in (10**400, 2**63, float("nan"), float("inf"), "\ud800", [1, [10**30]]):
        row = {"id": "new", "text": "x", "meta": {"n": bad}}
        change = collection.Change(rows={"text": [row]}, vectors={"text": np.ones((1, DIM))})
        with pytest.raises(ValueError, match=r"texts\[0\]\.meta\.n"):
            collection.change(store, loaded, change)
    assert store.versions() == versions


def test_empty_result_is_refused(tmp_path):
    store = IndexStore(tmp_path / "idx")
    _publish(store, n=5, sides=("image",))
    with pytest.raises(ValueError, match="leave the index empty"):
        collection.delete_ids(store, [f"i{i}" for i in range(5)])
    assert store.open().live_count("image") == 5


def test_warm_builds_every_filter_column_in_one_pass(tmp_path, monkeypatch):
    from index_builder import filters

    store = IndexStore(tmp_path / "idx")
    vectors, _ = _publish(store, n=60)
    loaded = store.open()
    passes = []
    build = filters.Columns.build
    monkeypatch.setattr(
        filters.Columns, "build", lambda self, f: passes.append(f) or build(self, f)
    )
    loaded.warm("image")
    assert passes == [{"group": "string", "n": "number"}]
    mask = loaded.filter_mask("image", {"group": "g3", "n": {"lt": 30}})
    assert len(passes) == 1  # searches find the columns built
    assert np.flatnonzero(mask).tolist() == [3, 13, 23]
