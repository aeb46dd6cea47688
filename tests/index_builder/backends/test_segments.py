"""FAISS segments: a side changed by adds, upserts and deletes (compaction crossed) searches
as a version built from scratch from its live rows; a change writes O(change) bytes, sharing
large bases (read-only hard links, checked by `cots index verify`); persisted id lookups."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest
from test_collection import DIM, _items, _publish

from index_builder import collection
from index_builder.backends.base import CorruptIndex, IndexOptions
from index_builder.backends.faiss import faiss_index, segments, version
from index_builder.backends.faiss.store import IndexStore

SIDES = ("image", "text")


def _live(loaded, side):
    """The live rows and their stored vectors, in row order."""
    rows = [i for i in range(len(loaded.rows(side))) if loaded.is_live(side, i)]
    return loaded.rows_at(side, rows), np.asarray(loaded.vectors[side][np.array(rows)])


def _expected_change(store, state, step):
    """Apply one step to the store and to `state` (id -> (row, vector) per side)."""
    kind, ids = step
    if kind == "delete":
        collection.delete_ids(store, ids)
        for i in ids:
            state["image"].pop(i)
            state["text"].pop(f"{i}#0")
        return
    vectors, rows = _items(len(ids), seed=len(state["image"]) + 7, prefix="z")
    rows = {
        "image": [{**r, "id": i} for r, i in zip(rows["image"], ids, strict=True)],
        "text": [
            {**r, "id": f"{i}#0", "image_id": i} for r, i in zip(rows["text"], ids, strict=True)
        ],
    }
    change = collection.Change(rows=rows, vectors=vectors, upsert=kind == "upsert")
    collection.change(store, store.open(), change)
    for side in SIDES:
        for row, vector in zip(rows[side], vectors[side], strict=True):
            state[side].pop(row["id"], None)
            state[side][row["id"]] = (row, vector)


def _reference(tmp_path, state, name):
    """A version built from scratch (exact) from the expected live rows."""
    store = IndexStore(tmp_path / name)
    store.publish(
        bundle_id="b1",
        dim=DIM,
        shards={side: [np.stack([v for _, v in state[side].values()])] for side in SIDES},
        rows={side: [r for r, _ in state[side].values()] for side in SIDES},
        options=IndexOptions(factory="Flat", queries=50, target_recall=0.99),
        dataset={},
    )
    return store.open()


def _ids(loaded, hits):
    return [[h.item["id"] for h in per_query] for per_query in hits]


STEPS = [
    ("add", [f"a{i}" for i in range(15)]),
    ("upsert", ["i3", "i4", "a2", "i100"]),
    ("delete", ["i5", "a7", "i6"]),
    ("add", [f"b{i}" for i in range(8)]),  # 27 delta rows of 327: still deltas
    ("delete", [f"i{i}" for i in range(10, 80)]),  # tombstones past 20%: compacted
    ("add", [f"c{i}" for i in range(5)]),
    ("upsert", ["c1", "i70"]),
]


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16_HNSW32,SQ8"])
def test_changed_side_searches_like_a_fresh_build(tmp_path, factory):
    store = IndexStore(tmp_path / "idx", keep=2)
    vectors, rows = _publish(store, n=300, factory=factory)
    state = {side: {r["id"]: (r, v) for r, v in zip(rows[side], vectors[side], strict=True)}
             for side in SIDES}  # fmt: skip
    queries = _items(20, seed=99)[0]
    kinds = []
    for number, step in enumerate(STEPS):
        _expected_change(store, state, step)
        loaded, reference = store.open(), _reference(tmp_path, state, f"ref{number}")
        kinds.append(len(loaded.info["sides"]["image"].get("segments", [])))
        for side in SIDES:
            live, stored = _live(loaded, side)
            assert sorted(r["id"] for r in live) == sorted(state[side])
            assert loaded.count(side) == reference.count(side) == len(state[side])
            for filter in (None, {"n": {"lt": 5}}):
                assert loaded.count(side, filter) == reference.count(side, filter)
            for item_id, (row, _) in state[side].items():
                assert loaded.rows_at(side, [loaded.row_of(side, item_id)]) == [row]
            last = list(state[side])[-1]  # the newest row: in a delta segment, mostly
            for filter, skip in ((None, None), ({"n": {"lt": 100}}, None), (None, last)):
                got = loaded.find(
                    side,
                    queries[side],
                    10,
                    filter=filter,
                    exclude=skip and loaded.row_of(side, skip),
                )
                want = reference.find(side, queries[side], 10, filter=filter,
                                      exclude=skip and reference.row_of(side, skip))  # fmt: skip
                if factory == "Flat":
                    assert _ids(loaded, got) == _ids(reference, want)
                    assert np.allclose([h.score for q in got for h in q],
                                       [h.score for q in want for h in q], atol=1e-5)  # fmt: skip
                else:
                    pairs = zip(_ids(loaded, got), _ids(reference, want), strict=True)
                    assert np.mean([len(set(a) & set(b)) for a, b in pairs]) / 10 >= 0.9
        for image_id in ("i3", "a2", "i5", "c1", "i200"):
            want = reference.caption_rows({image_id})
            got = loaded.caption_rows({image_id})
            assert [loaded.texts[i]["id"] for i in got] == [reference.texts[i]["id"] for i in want]
        for dead in ("i5", "a7", "i10"):
            if dead not in state["image"]:
                assert loaded.row_of("image", dead) is None
    assert kinds == [1, 2, 2, 3, 0, 1, 2]  # deltas grow, compaction folds them into a base


def _published(tmp_path, monkeypatch, share, n=200):
    monkeypatch.setattr(segments, "SHARE_BYTES", 0 if share else 1 << 30)
    store = IndexStore(tmp_path / "idx", keep=2)
    vectors, rows = _publish(store, n=n)
    return store, vectors, rows


@pytest.mark.parametrize("share", [False, True])
def test_a_change_writes_its_delta_and_carries_the_base(tmp_path, monkeypatch, share):
    store, vectors, _ = _published(tmp_path, monkeypatch, share, n=1000)
    first = store.open()
    new_vectors, new_rows = _items(2, seed=5, prefix="n")
    change = collection.Change(rows=new_rows, vectors=new_vectors)
    collection.change(store, first, change)
    second = store.open()
    base = ("image.faiss", "image.npy", "images.jsonl", "images.id.keys.npy", "images.columns.npz")
    for name in base:
        old, new = (first.path / name).stat(), (second.path / name).stat()
        assert (old.st_ino == new.st_ino) == share
        assert (first.path / name).read_bytes() == (second.path / name).read_bytes()
        if share:
            assert old.st_mode & 0o777 == 0o444 and old.st_nlink == 2
    shared = second.info["sides"]["image"].get("shared", {})
    assert set(shared) >= set(base) if share else shared == {}
    written = [p for p in second.path.iterdir() if p.stat().st_nlink == 1]
    delta = [p for p in written if ".d1." in p.name]
    assert {p.name for p in delta} >= {"image.d1.faiss", "image.d1.npy", "images.d1.jsonl"}
    base_bytes = sum((first.path / name).stat().st_size for name in base)
    assert sum(p.stat().st_size for p in delta) < base_bytes / 20  # 2 rows of 1000, headers


def test_pruning_keeps_files_a_kept_version_shares(tmp_path, monkeypatch):
    store, vectors, _ = _published(tmp_path, monkeypatch, share=True)
    for n in range(3):
        new_vectors, new_rows = _items(1, seed=n, prefix=f"p{n}-")
        change = collection.Change(rows=new_rows, vectors=new_vectors)
        collection.change(store, store.open(), change)
    assert len(store.versions()) == 2  # the first, and the second, pruned
    loaded = store.open()
    assert loaded.live_count("image") == 203 and store.verify() == []
    _, found = loaded.search("image", vectors["image"][:5], 1)
    assert found[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_verify_finds_a_damaged_shared_segment(tmp_path, monkeypatch):
    store, _, _ = _published(tmp_path, monkeypatch, share=True)
    collection.delete_ids(store, ["i3"])
    path = store.version_dir(store.current())
    assert store.verify() == []
    cli = [sys.executable, "-m", "index_builder.cli", "index", "verify", str(store.root)]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    assert subprocess.run(cli, env=env, capture_output=True).returncode == 0
    target = path / "image.npy"
    os.chmod(target, 0o644)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum tells
    target.write_bytes(bytes(data))
    assert store.verify() == ["image: shared file image.npy does not match its checksum"]
    done = subprocess.run(cli, env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "image.npy does not match its checksum" in done.stderr
    with target.open("ab") as handle:
        handle.write(b"grown")  # still maps and reads: only its recorded size tells
    with pytest.raises(CorruptIndex, match="image.npy has"):
        store.open()


def test_a_change_assigns_its_vectors_as_a_build_does_not_as_deep_as_searches(tmp_path):
    """A loaded IVF index's HNSW coarse quantizer searches nprobe deep; the delta a change
    fills from it assigns at the build's depth (24x cheaper at nprobe 1024), and the served
    index keeps its depth."""
    store = IndexStore(tmp_path / "idx")
    _publish(store, n=400, factory="IVF16_HNSW32,Flat")
    set_params = faiss_index.set_search_params
    first = store.open()
    set_params(first.indexes["image"], {"nprobe": 64})  # as deep as a large index's tuning
    new_vectors, new_rows = _items(3, seed=5, prefix="n")
    collection.change(store, first, collection.Change(rows=new_rows, vectors=new_vectors))
    assert _quantizer(first.indexes["image"]).hnsw.efSearch == 64  # the served copy untouched
    changed = store.open()
    template = changed.info["sides"]["image"]["template"]
    written = faiss_index.read_index(changed.path / template)
    assert _quantizer(written).hnsw.efSearch == faiss_index.ADD_EF_SEARCH
    nprobe = changed.info["sides"]["image"]["search_params"]["nprobe"]
    assert _quantizer(changed.indexes["image"]).hnsw.efSearch == max(16, nprobe)
    _, rows = changed.search("image", new_vectors["image"], 1)
    assert [changed.rows_at("image", [r])[0]["id"] for r in rows[:, 0]] == ["n0", "n1", "n2"]


def _quantizer(index):
    return faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)


def _checksums_hold(loaded):
    """Every file of every side recorded with its true size and digest."""
    for side in SIDES:
        info = loaded.info["sides"][side]
        record = info["checksums"]
        assert sorted(record) == sorted(segments.segment_files(info))
        for name, entry in record.items():
            assert entry["bytes"] == (loaded.path / name).stat().st_size
            assert entry["blake2b"] == segments.checksum(loaded.path / name)


@pytest.mark.parametrize("share", [False, True])
def test_a_build_records_the_checksums_a_change_would_read(tmp_path, monkeypatch, share):
    store, _, _ = _published(tmp_path, monkeypatch, share)
    loaded = store.open()
    if not share:  # small sides are copied by changes: nothing to record
        assert all("checksums" not in s for s in loaded.info["sides"].values())
        return
    _checksums_hold(loaded)
    read = []
    real = segments.checksum
    monkeypatch.setattr(segments, "checksum", lambda path: read.append(path.name) or real(path))
    new_vectors, new_rows = _items(2, seed=5, prefix="n")
    collection.change(store, loaded, collection.Change(rows=new_rows, vectors=new_vectors))
    changed = store.open()
    base = set(segments.segment_files(loaded.info["sides"]["image"]))
    assert read and not base & set(read)  # only the new delta's files were read
    assert set(changed.info["sides"]["image"]["shared"]) == base
    _checksums_hold(changed)
    assert store.verify() == []


def test_a_compacted_base_records_its_own_checksums(tmp_path, monkeypatch):
    store, _, _ = _published(tmp_path, monkeypatch, share=True)
    first = store.open()
    vectors, new = _items(60, seed=9)  # i0..i59 again, other vectors: 60 of 260 rows
    # tombstoned, so the side is compacted into files the size of the old base's
    collection.change(store, first, collection.Change(rows=new, vectors=vectors, upsert=True))
    compacted = store.open()
    info = compacted.info["sides"]["image"]
    assert "segments" not in info and info["rows"] == 200
    old = first.info["sides"]["image"]["checksums"]
    for name in ("image.npy", "image.faiss"):  # same sizes as the old base's: their digests
        new = info["checksums"][name]  # must be read again, not kept
        assert new["bytes"] == old[name]["bytes"] and new["blake2b"] != old[name]["blake2b"]
    _checksums_hold(compacted)
    assert store.verify() == []


def test_verify_finds_a_damaged_file_of_a_fresh_build(tmp_path, monkeypatch):
    store, _, _ = _published(tmp_path, monkeypatch, share=True)
    target = store.version_dir(store.current()) / "text.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    assert store.verify() == ["text: file text.npy does not match its checksum"]


def test_lookups_load_from_their_files_and_old_versions_build_them(tmp_path, monkeypatch):
    store = IndexStore(tmp_path / "idx")
    _publish(store, n=50)
    new_vectors, new_rows = _items(2, seed=5, prefix="n")
    collection.change(store, store.open(), collection.Change(rows=new_rows, vectors=new_vectors))
    built = []
    real = version.key_indexes
    monkeypatch.setattr(version, "key_indexes", lambda *a: built.append(1) or real(*a))
    loaded = store.open()
    assert loaded.row_of("image", "n1") == 51 and loaded.caption_rows({"i7"}) == [7]
    assert built == []  # no pass over rows: every segment's lookups were written with it
    info_path = loaded.path / "index.json"
    info = json.loads(info_path.read_text())
    for side_info in info["sides"].values():  # as a version written before the lookups
        side_info.pop("keys")
        for segment in side_info["segments"]:
            segment.pop("keys")
    info_path.write_text(json.dumps(info))
    for name in loaded.path.glob("*.keys.npy"):
        name.unlink()
    old = store.open()
    assert old.row_of("image", "n1") == 51 and old.caption_rows({"i7"}) == [7]
    assert old.row_of("text", "n0#0") == 50 and len(built) == 4  # two segments a side


def test_warming_a_side_without_fields_reads_no_rows(tmp_path, monkeypatch):
    store = IndexStore(tmp_path / "idx")
    vectors, rows = _items(30)
    for side in SIDES:
        for row in rows[side]:
            row.pop("meta")
    store.publish(
        bundle_id="b1",
        dim=DIM,
        shards={side: [vectors[side]] for side in SIDES},
        rows=rows,
        options=IndexOptions(factory="Flat"),
        dataset={},
    )
    loaded = store.open()
    read = []
    monkeypatch.setattr(version.Metas, "__iter__", lambda self: read.append(1) or iter(()))
    for side in SIDES:
        loaded.warm(side)
    assert read == [] and loaded.row_of("text", "i4#0") == 4


def test_filter_columns_load_from_their_files(tmp_path, monkeypatch):
    store = IndexStore(tmp_path / "idx")
    _publish(store, n=50)
    new_vectors, new_rows = _items(3, seed=5, prefix="n")
    new_rows["image"][0]["meta"]["colour"] = "red"  # a field only the delta has
    collection.change(store, store.open(), collection.Change(rows=new_rows, vectors=new_vectors))
    loaded = store.open()
    assert loaded.info["sides"]["image"]["segments"][0]["columns"] == "images.d1.columns.npz"
    read = []
    real = version.Metas.__iter__
    monkeypatch.setattr(version.Metas, "__iter__", lambda self: read.append(1) or real(self))
    loaded.warm("text")
    assert read == []  # every field of every segment saved: no pass over the rows
    loaded.warm("image")
    assert read == [1]  # "colour": built in one pass, the base having saved none
    metas = [row.get("meta") or {} for row in loaded.rows("image")]
    for filter, wanted in (
        ({"group": "g3"}, lambda m: m.get("group") == "g3"),
        ({"n": {"gte": 10}}, lambda m: m.get("n", -1) >= 10),
        ({"group": {"in": ["g0", "g1"]}}, lambda m: m.get("group") in ("g0", "g1")),
        ({"colour": "red"}, lambda m: m.get("colour") == "red"),
    ):
        mask = loaded.filter_mask("image", filter)
        assert mask.tolist() == [wanted(m) for m in metas]
