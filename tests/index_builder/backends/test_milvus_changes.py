"""Milvus changes in place (on the real server, `milvus_uri`): a change is no new version
but a logged edit of the current collection; a change killed halfway is undone or finished
by the next writer; a reader opened elsewhere takes the change; history and switching back
are as stated."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from index_builder import collection
from index_builder.backends import BackendConfig, open_store
from index_builder.backends.base import IndexOptions
from index_builder.backends.milvus import change as milvus_change
from index_builder.backends.milvus import version as milvus_version

DIM = 8


class Killed(BaseException):
    """The writer dies here (as kill -9 would: no clean-up of its own runs)."""


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def store(tmp_path, milvus_uri):
    config = BackendConfig("milvus", milvus_uri=milvus_uri)
    return open_store(tmp_path / "work", config, keep=2)


def _publish(store, n=40, seed=0):
    rng = np.random.default_rng(seed)
    vectors = {side: _unit(rng.standard_normal((n, DIM))) for side in ("image", "text")}
    rows = {
        "image": [{"id": f"i{i}", "image": "/g", "meta": {"n": i}} for i in range(n)],
        "text": [{"id": f"i{i}#0", "text": "c", "image_id": f"i{i}"} for i in range(n)],
    }
    shards = {side: [v] for side, v in vectors.items()}
    version = store.publish(bundle_id="b1", dim=DIM, shards=shards, rows=rows,
                            options=IndexOptions(queries=50), dataset={})  # fmt: skip
    return version, vectors


def _upsert_i3(store, vector):
    """Replace image i3 (and so its caption) with a new row holding `vector`."""
    row = {"id": "i3", "image": "/new", "meta": {"n": 3, "colour": "blue"}}
    request = collection.Change(rows={"image": [row]}, vectors={"image": vector[None]}, upsert=True)
    return collection.change(store, store.open(), request)


def _ids(loaded, side):
    """Every live id of a side (a search as deep as the side)."""
    count = loaded.live_count(side)
    _, found = loaded.search(side, np.ones((1, DIM), np.float32), count + 5)
    return sorted(row["id"] for row in loaded.rows_at(side, [r for r in found[0] if r >= 0]))


def test_a_change_is_logged_in_place_and_a_reader_elsewhere_takes_it(store, monkeypatch):
    version, vectors = _publish(store)
    reader = store.open()  # as another process would hold it
    result = _upsert_i3(store, -vectors["image"][0])
    assert result.version == version and store.versions() == [version]
    assert result.replaced == {"image": 1, "text": 0} and result.deleted["text"] == 1
    loaded = store.open()
    assert loaded.live_count("image") == 40 and loaded.live_count("text") == 39  # caption gone
    _, found = loaded.search("image", -vectors["image"][:1], 1, filter={"colour": "blue"})
    assert [r["id"] for r in loaded.rows_at("image", found[0])] == ["i3"]
    [entry] = store.changes()
    assert entry["state"] == "done" and entry["added"] == {"image": 1, "text": 0}
    assert entry["deleted"] == {"image": 1, "text": 1} and store.read_info()["changes"] == 1
    assert "colour" not in reader.info["sides"]["image"]["fields"]  # not re-read yet
    monkeypatch.setattr(milvus_version, "REFRESH_S", 0.0)
    assert reader.count("image", {"colour": "blue"}) == 1 and reader.live_count("text") == 39


def test_a_change_killed_before_its_deletes_is_undone_by_the_next_writer(store, monkeypatch):
    _publish(store)
    from pymilvus import MilvusClient

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(MilvusClient, "delete", killed)  # dies after inserting, before deleting
    monkeypatch.setattr(milvus_change, "recover", lambda *a, **k: None)  # and cleans nothing
    with pytest.raises(Killed):
        _upsert_i3(store, np.ones(DIM, np.float32) / np.sqrt(DIM))
    monkeypatch.undo()
    assert store.read_info()["pending"]["inserted"] is True
    assert _ids(store.open(), "image").count("i3") == 2  # old and new row, until recovered
    collection.delete_ids(store, ["i7"])  # the next writer undoes the cut-off change first
    loaded = store.open()
    assert _ids(loaded, "image").count("i3") == 1 and "pending" not in loaded.info
    assert loaded.rows_at("image", [loaded.row_of("image", "i3")])[0]["image"] == "/g"
    assert loaded.live_count("image") == 39 and loaded.live_count("text") == 39
    assert [e["state"] for e in store.changes()] == ["undone", "done"]


def test_a_change_killed_after_its_writes_is_recorded_done(store, monkeypatch):
    version, vectors = _publish(store)

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(milvus_change, "_check", killed)  # dies after inserts and deletes
    monkeypatch.setattr(milvus_change, "recover", lambda *a, **k: None)
    with pytest.raises(Killed):
        _upsert_i3(store, -vectors["image"][0])
    monkeypatch.undo()
    second, _ = _publish(store, seed=1)  # a build recovers the pending change first
    assert [e["state"] for e in store.changes(version)] == ["done on recovery"]
    first = store.read_info(version)
    assert first["sides"]["image"]["count"] == 40 and first["sides"]["text"]["count"] == 39
    store.switch(version)  # switching back serves the first collection with its change
    loaded = store.open()
    assert loaded.version == version and _ids(loaded, "image").count("i3") == 1
    assert loaded.rows_at("image", [loaded.row_of("image", "i3")])[0]["image"] == "/new"
    assert store.changes(second) == []


def test_pruned_versions_take_their_change_log_with_them(store):
    first, vectors = _publish(store)
    _upsert_i3(store, vectors["image"][1])
    _publish(store, seed=1)
    _publish(store, seed=2)  # keep=2: the first goes, with its change record
    found = store.client.query(
        store.records, filter='version != ""', output_fields=["version"], consistency_level="Strong"
    )
    assert not [r["version"] for r in found if r["version"].startswith(first)]
    assert len(store.versions()) == 2


WRITER = """
import sys, time
import numpy as np
from pymilvus import MilvusClient
from index_builder import collection
from index_builder.backends import BackendConfig, open_store

MilvusClient.delete = lambda *args, **kwargs: time.sleep(3600)  # stalls before its deletes
store = open_store(sys.argv[2], BackendConfig("milvus", milvus_uri=sys.argv[1]))
row = {"id": "i3", "image": "/new", "meta": {"n": 3}}
vector = np.ones((1, int(sys.argv[3])), np.float32) / np.sqrt(int(sys.argv[3]))
request = collection.Change(rows={"image": [row]}, vectors={"image": vector}, upsert=True)
collection.change(store, store.open(), request)
"""


def test_a_writer_killed_with_sigkill_mid_change_is_undone(store, tmp_path):
    """A real kill -9 of another process between its inserts and its deletes: the next
    writer (this process) undoes the change; the item is there once, as it was."""
    _publish(store)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    root = Path(__file__).resolve().parents[3]
    writer = subprocess.Popen(
        [sys.executable, str(script), store.uri, str(store.root), str(DIM)],
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        deadline = time.monotonic() + 120
        while not (store.read_info().get("pending") or {}).get("inserted"):
            assert writer.poll() is None and time.monotonic() < deadline, "the writer ended"
            time.sleep(0.2)
    finally:
        writer.kill()  # SIGKILL: no clean-up of its own
        writer.wait()
    assert _ids(store.open(), "image").count("i3") == 2
    collection.delete_ids(store, ["i7"])
    loaded = store.open()
    assert _ids(loaded, "image").count("i3") == 1 and "i7" not in _ids(loaded, "image")
    assert loaded.rows_at("image", [loaded.row_of("image", "i3")])[0]["image"] == "/g"
    assert [e["state"] for e in store.changes()] == ["undone", "done"]
