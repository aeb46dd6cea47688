"""Lazy rows: the memory-mapped JSONL sequence against `read_jsonl`, and a loaded version's
lookups against the old in-memory ones (dicts and full passes over parsed rows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_collection import _items, _publish

from index_builder import collection
from index_builder.atomic import read_jsonl
from index_builder.backends.base import CorruptIndex
from index_builder.backends.faiss import rows
from index_builder.backends.faiss.rows import JsonlRows, KeyIndex, Metas, key_hash
from index_builder.backends.faiss.store import IndexStore

ROWS = [
    {"id": "a", "text": "plain", "meta": {"n": 1}},
    {"id": "b", "text": "ünïcödé ✓ 日本語 \u2028 emoji 🙂", "meta": {}},
    {"id": 3, "captions": ["x", "y"]},
    {"id": "d", "text": " leading and trailing spaces "},
]
# Blank lines of every kind `read_jsonl` skips, \r\n and lone \r breaks, indented rows, and
# unicode whitespace (U+00A0, U+2003) that only `str.strip` calls blank.
MESSY = (
    "\n  \t\n"
    + json.dumps(ROWS[0])
    + "\r\n\r\n"
    + json.dumps(ROWS[1], ensure_ascii=False)
    + "\n\u00a0\u2003\n\x0c\x1c\n"
    + "   "
    + json.dumps(ROWS[2])
    + "\r"
    + json.dumps(ROWS[3], ensure_ascii=False)
)


def _write(path, text):
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.mark.parametrize("trailing", ["", "\n", "\n\n  ", "\r"])
@pytest.mark.parametrize("scan", [1 << 24, 1, 7])  # 1 and 7: breaks across scan chunks
def test_rows_match_read_jsonl(tmp_path, monkeypatch, trailing, scan):
    monkeypatch.setattr(rows, "_SCAN", scan)
    path = _write(tmp_path / "rows.jsonl", MESSY + trailing)
    expected = read_jsonl(path)
    assert expected == ROWS
    lazy = JsonlRows(path)
    assert len(lazy) == len(expected) and list(lazy) == expected
    assert [lazy[i] for i in range(-len(expected), len(expected))] == expected + expected
    for index in (slice(None), slice(1, 3), slice(None, None, -1), slice(-3, None, 2)):
        assert lazy[index] == expected[index]
    assert lazy[np.int64(1)] == expected[1]
    for bad in (len(expected), -len(expected) - 1):
        with pytest.raises(IndexError, match=f"row {bad} out of range for 4 rows"):
            lazy[bad]


@pytest.mark.parametrize("end", ["", "\n"])
def test_plain_rows_with_and_without_a_final_newline(tmp_path, end):
    lines = [json.dumps(row, ensure_ascii=False) for row in ROWS]
    path = _write(tmp_path / "rows.jsonl", "\n".join(lines) + end)
    assert list(JsonlRows(path)) == read_jsonl(path) == ROWS
    assert [JsonlRows(path).line(i) for i in range(-4, 0)] == lines


@pytest.mark.parametrize("text", ["", "\n", " \n\r\n\t", "\u00a0"])
def test_blank_files_have_no_rows(tmp_path, text):
    path = _write(tmp_path / "rows.jsonl", text)
    assert read_jsonl(path) == [] and len(JsonlRows(path)) == 0 and list(JsonlRows(path)) == []


def test_rows_are_new_dicts_and_lines_are_as_stored(tmp_path):
    path = _write(tmp_path / "rows.jsonl", MESSY)
    lazy = JsonlRows(path)
    lazy[0]["meta"]["n"] = 99
    assert lazy[0] == ROWS[0]
    assert lazy.line(1) == json.dumps(ROWS[1], ensure_ascii=False)
    assert lazy.line(2) == "   " + json.dumps(ROWS[2])
    assert list(Metas(lazy)) == [{"n": 1}, {}, {}, {}] and Metas(lazy)[:1] == [{"n": 1}]


def test_key_index_finds_every_row_of_a_hash_in_row_order():
    hashes = np.array([key_hash("x"), key_hash("y"), key_hash("x"), 5])
    keyed = KeyIndex(np.array([4, 1, 7, 2]), hashes)
    assert keyed.find("x") == [4, 7] and keyed.find("y") == [1] and keyed.find("z") == []


def _reference(loaded, side):
    """The lookups as the in-memory LoadedIndex made them: a dict over the live rows."""
    rows, dead = list(loaded.rows(side)), loaded.deleted.get(side)
    return {str(r["id"]): i for i, r in enumerate(rows) if dead is None or not dead[i]}


def _reference_captions(loaded, image_ids):
    rows, dead = list(loaded.rows("text")), loaded.deleted.get("text")
    return [
        i
        for i, row in enumerate(rows)
        if row.get("image_id") in image_ids and (dead is None or not dead[i])
    ]


@pytest.mark.parametrize("collide", [False, True])
def test_lookups_match_the_in_memory_ones(tmp_path, monkeypatch, collide):
    if collide:  # every key hashes alike: rows are told apart by reading them
        monkeypatch.setattr(rows, "key_hash", lambda key: 0)
    store = IndexStore(tmp_path / "idx")
    vectors, items = _publish(store, n=40)
    collection.delete_ids(store, ["i3", "i8#0"])
    upsert = collection.Change(
        rows={"image": [{**items["image"][5], "captions": ["new"]}],
              "text": [{"id": "i5#0", "image_id": "i5", "text": "new"}]},
        vectors={"image": vectors["image"][:1], "text": vectors["text"][:1]},
        upsert=True,
    )  # fmt: skip
    collection.change(store, store.open(), upsert)
    loaded = store.open()
    assert loaded.deleted["image"] is not None  # tombstones, and i5 twice on each side
    for side in ("image", "text"):
        reference = _reference(loaded, side)
        ids = [str(row["id"]) for row in list(loaded.rows(side))]
        assert {i: loaded.row_of(side, i) for i in ids} == {i: reference.get(i) for i in ids}
        assert loaded.rows_of(side, [*ids, "nope"]) == reference
    for image_ids in ({"i5"}, {"i3", "i8", "i9", "nope"}, set()):
        assert loaded.caption_rows(image_ids) == _reference_captions(loaded, image_ids)


def test_loaded_rows_and_hits_are_the_stored_ones(tmp_path):
    store = IndexStore(tmp_path / "idx")
    vectors, items = _publish(store, n=50)
    loaded = store.open()
    assert isinstance(loaded.images, JsonlRows) and list(loaded.images) == items["image"]
    assert list(loaded.texts) == items["text"] and len(loaded.rows("video")) == 0
    _, found = loaded.search("image", vectors["text"][:5], 3, filter={"group": "g3"})
    hits = loaded.rows_at("image", found[0])
    assert hits == [items["image"][r] for r in found[0]] and found[0, 0] == 3
    assert loaded.count("image", {"n": {"lt": 10}}) == 10


def test_hand_edited_version_files_load_and_change_as_before(tmp_path):
    """Blank lines and no final newline in a version's rows: the same rows as read_jsonl,
    and a change carries them as they are, its new rows a well-formed delta segment."""
    store = IndexStore(tmp_path / "idx")
    vectors, items = _publish(store, n=20)
    path = store.open().path / "images.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n \n".join(lines), encoding="utf-8")  # no final newline
    with pytest.raises(CorruptIndex, match="images.jsonl has"):
        store.open()  # not the size written: refused, as a truncated file would be
    info_path = path.parent / "index.json"
    info = json.loads(info_path.read_text())
    info["sides"]["image"].pop("meta_bytes")  # as written by hand (or before sizes were)
    info_path.write_text(json.dumps(info))
    loaded = store.open()
    assert list(loaded.images) == read_jsonl(path) == items["image"]
    _, new = _items(1, seed=2, prefix="n")
    change = collection.Change(
        rows={"image": new["image"]}, vectors={"image": vectors["image"][:1]}
    )
    collection.change(store, loaded, change)
    after = store.open()
    written = after.path / "images.d1.jsonl"
    assert list(after.images) == read_jsonl(path) + read_jsonl(written)
    assert list(after.images) == items["image"] + new["image"]
    assert written.read_text(encoding="utf-8").count("\n") == 1
    assert after.info["sides"]["image"]["fields"] == {"group": "string", "n": "number"}


def test_row_count_mismatch_is_refused(tmp_path):
    store = IndexStore(tmp_path / "idx")
    _publish(store, n=20)
    path = store.open().path / "texts.jsonl"
    path.write_text("\n".join(path.read_text(encoding="utf-8").splitlines()[:-1]) + "\n")
    with pytest.raises(ValueError, match="inconsistent: text index holds 20 vectors for 19 rows"):
        store.open()


def _mapped_kib(path):
    """Resident KiB of this process's mappings of `path` (Linux smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if line[:1].isdigit() or line[:1] in "abcdef":  # a mapping's header line
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="Linux /proc only")
def test_full_passes_leave_no_rows_resident(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"i{i}", "pad": "x" * 200}) + "\n" for i in range(20000))
    )
    loaded = JsonlRows(path)  # finding the lines reads the whole file (4 MB)
    assert _mapped_kib(path) < 256
    assert sum(1 for _ in loaded) == 20000  # so does building the id lookups
    assert _mapped_kib(path) < 256
    # rows read on demand (search hits) come by pread: none of their pages is mapped
    picks = np.random.default_rng(0).permutation(20000)[:500].tolist()
    assert [loaded[i]["id"] for i in picks] == [f"i{i}" for i in picks]
    assert _mapped_kib(path) == 0


def test_a_row_of_a_file_truncated_after_loading_is_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": f"i{i}"}) + "\n" for i in range(100)))
    loaded = JsonlRows(path)
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    assert loaded[0]["id"] == "i0"
    with pytest.raises(CorruptIndex, match="truncated after it was loaded"):
        loaded[99]
