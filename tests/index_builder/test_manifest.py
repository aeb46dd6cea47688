from __future__ import annotations

import json

import pytest

from index_builder.manifest import (
    Record,
    image_path,
    load_records,
    read_info,
    read_manifest,
    write_manifest,
)


def make_records(n=5):
    return [
        Record(
            id=f"r{i}",
            image=f"images/r{i}.png",
            captions=(f"caption {i}", f"other {i}"),
            split=("train", "val", "test")[i % 3],
        )
        for i in range(n)
    ]


def test_round_trip_and_split_filter(tmp_path):
    info = write_manifest(tmp_path, make_records(), {"name": "toy"})
    assert info["count"] == 5 and info["captions"] == 10
    assert info["splits"] == {"train": 2, "val": 2, "test": 1}
    assert read_info(tmp_path)["name"] == "toy"
    back = load_records(tmp_path)
    assert back == make_records()
    assert [r.id for r in read_manifest(tmp_path, "val")] == ["r1", "r4"]
    assert image_path(tmp_path, back[0]) == tmp_path / "images/r0.png"


def test_record_validation():
    with pytest.raises(ValueError, match="no non-empty caption"):
        Record(id="a", image="x.png", captions=("  ", ""))
    with pytest.raises(ValueError, match="split"):
        Record(id="a", image="x.png", captions=("c",), split="holdout")
    assert Record(id="a", image="x.png", captions=(" hi ", "")).captions == ("hi",)


def test_duplicate_ids_keep_previous_manifest(tmp_path):
    write_manifest(tmp_path, make_records(3), {"name": "old"})
    before = (tmp_path / "manifest.jsonl").read_text()
    with pytest.raises(ValueError, match="duplicate record id"):
        write_manifest(tmp_path, make_records(3) + make_records(1), {"name": "new"})
    assert (tmp_path / "manifest.jsonl").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no usable records"):
        write_manifest(tmp_path, [], {})
    assert not (tmp_path / "manifest.jsonl").exists()


def test_malformed_line_names_file_and_line(tmp_path):
    lines = [make_records(1)[0].to_json(), "{not json"]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl:2: bad manifest line"):
        load_records(tmp_path)
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"id": "a", "image": "x", "captions": ["c"], "colour": 1}) + "\n"
    )
    with pytest.raises(ValueError, match="unknown manifest keys"):
        load_records(tmp_path)


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="cots data"):
        load_records(tmp_path)


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from index_builder.atomic import atomic_write_text

    atomic_write_text(tmp_path / "f.txt", "x")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~mask
