"""The Milvus backend's own behaviour (milvus-lite): bad URIs, tokens and aliases are one
clear error, a failed build leaves the alias where it was, ANN recall is measured and held."""

from __future__ import annotations

import json

import numpy as np
import pytest

from index_builder.backends import BackendConfig, open_store
from index_builder.backends.base import BackendFailed, IndexOptions
from index_builder.backends.milvus import write as milvus_write
from index_builder.backends.milvus.change import write_records
from index_builder.backends.milvus.client import choose_index, milvus_error, search_grid

DIM = 16


def _store(tmp_path, **config):
    config = {"milvus_uri": str(tmp_path / "m.db"), **config}
    return open_store(tmp_path / "work", BackendConfig("milvus", **config), keep=2)


def _gallery(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, DIM))
    images = centres[rng.integers(0, 32, n)] + 0.5 * rng.standard_normal((n, DIM))
    texts = images + 0.4 * rng.standard_normal((n, DIM))
    vectors = {
        side: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        for side, x in (("image", images), ("text", texts))
    }
    rows = {
        "image": [{"id": f"i{i}", "image": "/g", "meta": {"n": i % 7}} for i in range(n)],
        "text": [{"id": f"t{i}", "text": "c", "image_id": f"i{i}"} for i in range(n)],
    }
    return vectors, rows


def _publish(store, n=60, seed=0, target=0.95):
    vectors, rows = _gallery(n, seed)
    shards = {side: [v] for side, v in vectors.items()}
    options = IndexOptions(queries=200, target_recall=target)
    version = store.publish(bundle_id="b1", dim=DIM, shards=shards, rows=rows,
                            options=options, dataset={})  # fmt: skip
    return version, vectors


def test_bad_uri_unreachable_server_and_refused_token_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs a URI: --milvus-uri"):
        BackendConfig("milvus")
    with pytest.raises(ValueError, match="unknown backend 'qdrant'"):
        BackendConfig("qdrant")
    with pytest.raises(ValueError, match="bad Milvus URI 'ftp://x'"):
        _store(tmp_path, milvus_uri="ftp://x")
    with pytest.raises(
        ConnectionError, match="cannot reach Milvus at http://127.0.0.1:1 to connect"
    ):
        _store(tmp_path, milvus_uri="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="unknown Milvus index type 'DISKANN'"):
        _store(tmp_path, milvus_index="DISKANN")
    with pytest.raises(ValueError, match="bad Milvus collection name '1x'"):
        _store(tmp_path, milvus_collection="1x")

    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    def refuse(self, **kwargs):
        raise MilvusException(1800, "auth check failure, please check username and password")

    monkeypatch.setattr(MilvusClient, "list_collections", refuse)
    with pytest.raises(PermissionError, match=r"refused the credentials \(COTS_MILVUS_TOKEN\)"):
        _store(tmp_path, milvus_token="wrong")


def test_milvus_errors_are_classified():
    from pymilvus.exceptions import MilvusException

    down = milvus_error("http://m:19530", "search", MilvusException(2, "Fail connecting to server"))
    assert isinstance(down, ConnectionError) and "cannot reach Milvus at http://m:19530" in str(
        down
    )
    other = milvus_error("u", "search", MilvusException(1100, "invalid expression"))
    assert (
        type(other) is BackendFailed
        and str(other) == "Milvus at u failed to search: invalid expression"
    )


def test_alias_to_a_foreign_collection_and_a_wrong_dimension_are_refused(tmp_path):
    store = _store(tmp_path)
    version, _ = _publish(store)
    info = store.read_info(version)
    write_records(
        store.client, store.uri, store.records, {version: {**info, "embed_dim": 32}}, True
    )
    with pytest.raises(ValueError, match="holds 16-dimensional vectors but index version .* 32"):
        store.open()
    store.client.create_collection("cots_other", dimension=4)
    store.client.alter_alias("cots_other", "cots")
    with pytest.raises(ValueError, match="names collection 'cots_other', which `cots index` did"):
        store.current()


def test_a_failed_build_leaves_the_alias_and_is_cleared(tmp_path, monkeypatch):
    store = _store(tmp_path)
    first, _ = _publish(store)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(milvus_write, "tune_side", fail)
    with pytest.raises(OSError, match="disk full"):
        _publish(store, seed=1)
    monkeypatch.undo()
    assert store.current() == first and store.versions() == [first]
    assert store.client.list_collections().count(store.collection_of(first)) == 1
    assert [c for c in store.client.list_collections() if c.startswith("cots_v0")] == [
        store.collection_of(first)
    ]
    debris = store.collection_of("v000009-20000101T000000Z")  # a killed build's collection
    store.client.create_collection(debris, dimension=4)
    second, _ = _publish(store, seed=2)
    third, _ = _publish(store, seed=3)  # keep=2: the first goes
    assert debris not in store.client.list_collections()
    assert store.versions() == [second, third] and store.current() == third


@pytest.mark.parametrize("kind", ["HNSW", "IVF_FLAT"])
def test_ann_recall_is_measured_and_held(tmp_path, kind):
    store = _store(tmp_path, milvus_index=kind)
    version, vectors = _publish(store, n=3000, target=0.95)
    side = store.read_info(version)["sides"]["image"]
    assert side["index_type"] == kind and side["recall_at_10"] >= 0.95
    assert set(side["search_params"]) == {"ef" if kind == "HNSW" else "nprobe"}
    loaded = store.open()
    queries = vectors["text"][1000:1100]
    for filter, allowed in ((None, np.ones(3000, bool)), ({"n": 3}, np.arange(3000) % 7 == 3)):
        _, found = loaded.search("image", queries, 10, filter=filter)
        ids = [[int(r["id"][1:]) for r in loaded.rows_at("image", q[q >= 0])] for q in found]
        rows = np.flatnonzero(allowed)
        truth = rows[np.argsort(-(queries @ vectors["image"][rows].T), axis=1)[:, :10]]
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(ids, truth, strict=True)])
        assert recall >= 0.9 and all(allowed[f].all() for f in ids)


def test_deep_pages_and_short_queries_widen_the_search(tmp_path):
    store = _store(tmp_path, milvus_index="IVF_FLAT")
    _, vectors = _publish(store, n=3000, target=0.8)
    loaded = store.open()
    tuned = loaded.info["sides"]["image"]["search_params"]["nprobe"]
    queries = vectors["text"][:20]
    _, found = loaded.search("image", queries, 600)  # deeper than the tuned lists hold
    assert (found >= 0).all()
    truth = np.argsort(-(queries @ vectors["image"].T), axis=1)[:, :600]
    ids = [[int(r["id"][1:]) for r in loaded.rows_at("image", q)] for q in found]
    recall = np.mean([len(set(f) & set(t)) / 600 for f, t in zip(ids, truth, strict=True)])
    assert recall >= 0.9 and tuned < 128
    _, found = loaded.search("image", queries, 600, filter={"n": 2})  # 429 allowed
    assert found.shape == (20, 429) and (found >= 0).all()


def test_index_choice_and_search_grid():
    assert choose_index("AUTO", {}, 5_000) == ("FLAT", {})
    assert choose_index("AUTO", {}, 40_000) == ("HNSW", {"M": 32, "efConstruction": 200})
    assert choose_index("AUTO", {}, 1_000_000)[0] == "IVF_FLAT"
    kind, params = choose_index("GPU_CAGRA", {"graph_degree": 64}, 10)
    assert kind == "GPU_CAGRA" and params["graph_degree"] == 64
    assert search_grid("GPU_CAGRA", params, 10)[0] == {"itopk_size": 32}
    assert search_grid("IVF_FLAT", {"nlist": 16}, 10)[-1] == {"nprobe": 16}
    assert search_grid("HNSW", {}, 20)[0] == {"ef": 24} and search_grid("FLAT", {}, 10) == [{}]


def test_records_survive_a_reopen(tmp_path):
    store = _store(tmp_path)
    version, _ = _publish(store)
    again = _store(tmp_path)
    assert again.current() == version and again.open().live_count("image") == 60
    info = json.loads(json.dumps(again.read_info()))
    assert info["backend"] == "milvus" and info["next_row"] == 120
