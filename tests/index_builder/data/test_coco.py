from __future__ import annotations

import hashlib
import json

import pytest
from data_fixtures import run_cli, write_image

from index_builder.data.coco import CocoConfig, KarpathyConfig, import_coco, import_karpathy
from index_builder.data.common import split_of
from index_builder.manifest import load_records


def test_coco_groups_captions_and_skips_bad_rows(tmp_path):
    write_image(tmp_path / "imgs/1.jpg", fmt="JPEG")
    write_image(tmp_path / "imgs/2.jpg", fmt="JPEG")
    (tmp_path / "imgs/3.jpg").write_bytes(b"garbage")
    coco = {
        "images": [
            {"id": 1, "file_name": "1.jpg"},
            {"id": 2, "file_name": "2.jpg"},
            {"id": 3, "file_name": "3.jpg"},
            {"id": 4, "file_name": "missing.jpg"},
            {"file_name": "no-id.jpg"},
        ],
        "annotations": [
            {"image_id": 1, "caption": "A dog  on a beach."},
            {"image_id": 1, "caption": "a brown dog"},
            {"image_id": 2, "caption": "   "},
            {"image_id": 3, "caption": "a cat"},
            {"image_id": 4, "caption": "a bird"},
            {"image_id": 99, "caption": "orphan"},
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    result = import_coco(
        CocoConfig(str(path), str(tmp_path / "imgs"), split="test"), tmp_path / "ds"
    )
    [record] = load_records(tmp_path / "ds")
    assert record.id == "coco.1" and record.split == "test"
    assert record.captions == ("A dog on a beach.", "a brown dog")
    assert record.image == str(tmp_path / "imgs/1.jpg")
    assert result.skipped == {
        "malformed image entry": 1,
        "empty or malformed caption": 1,
        "caption of an unknown image": 1,
        "image without captions": 1,
        "unreadable image": 1,
        "missing image": 1,
    }


def test_coco_duplicate_image_ids_are_merged_or_refused_never_mixed(tmp_path):
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        write_image(tmp_path / "imgs" / name, fmt="JPEG")
    coco = {
        "images": [
            {"id": 1, "file_name": "1.jpg"},
            {"id": 1, "file_name": "1.jpg"},  # the same entry twice: merged
            {"id": 2, "file_name": "2.jpg"},
            {"id": 2, "file_name": "3.jpg"},  # id 2 names two files: which one is "a cat"?
        ],
        "annotations": [
            {"image_id": 1, "caption": "a dog"},
            {"image_id": 2, "caption": "a cat"},
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    result = import_coco(CocoConfig(str(path), str(tmp_path / "imgs")), tmp_path / "ds")
    [record] = load_records(tmp_path / "ds")
    assert (record.id, record.image, record.captions) == (
        "coco.1",
        str(tmp_path / "imgs/1.jpg"),
        ("a dog",),
    )
    assert result.merged == {"repeated image entry": 1}
    assert result.skipped == {
        "image id shared by different files": 2,
        "caption of an image id shared by different files": 1,
    }


def test_coco_whole_input_errors(tmp_path):
    (tmp_path / "imgs").mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        import_coco(CocoConfig(str(bad), str(tmp_path / "imgs")), tmp_path / "ds")
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="is not a COCO captions file"):
        import_coco(CocoConfig(str(bad), str(tmp_path / "imgs")), tmp_path / "ds")
    with pytest.raises(FileNotFoundError, match="COCO captions file not found"):
        import_coco(
            CocoConfig(str(tmp_path / "none.json"), str(tmp_path / "imgs")), tmp_path / "ds"
        )
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="no usable records"):
        import_coco(CocoConfig(str(bad), str(tmp_path / "imgs")), tmp_path / "ds")


def test_karpathy_splits_paths_and_restval(tmp_path):
    write_image(tmp_path / "coco/val2014/a.jpg", fmt="JPEG")
    write_image(tmp_path / "coco/b.jpg", fmt="JPEG")  # filepath given but flat folder
    write_image(tmp_path / "coco/c.jpg", fmt="JPEG")
    write_image(tmp_path / "coco/d.jpg", fmt="JPEG")
    rows = [
        {
            "filename": "a.jpg",
            "filepath": "val2014",
            "split": "test",
            "sentences": [{"raw": "a cat"}, {"raw": "a kitten"}],
        },
        {
            "filename": "b.jpg",
            "filepath": "train2014",
            "split": "restval",
            "sentences": [{"raw": "a dog"}],
        },
        {"filename": "c.jpg", "split": "holdout", "sentences": [{"raw": "x"}]},
        {"filename": "c.jpg", "split": "val", "sentences": []},
        {"split": "train"},
        {"filename": "d.jpg", "sentences": [{"raw": "no split given"}]},
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": rows}))
    result = import_karpathy(KarpathyConfig(str(path), str(tmp_path / "coco")), tmp_path / "ds")
    records = {r.id: r for r in load_records(tmp_path / "ds")}
    assert records["coco.a"].split == "test" and records["coco.a"].captions == ("a cat", "a kitten")
    assert records["coco.b"].split == "train"
    assert records["coco.b"].image == str(tmp_path / "coco/b.jpg")
    digest = hashlib.sha1((tmp_path / "coco/d.jpg").read_bytes()).hexdigest()
    assert records["coco.d"].split == split_of(digest)  # the shared rule where none is given
    assert result.skipped == {
        "unknown split 'holdout'": 1,
        "image without captions": 1,
        "malformed image entry": 1,
    }
    assert import_karpathy(
        KarpathyConfig(str(path), str(tmp_path / "coco")), tmp_path / "ds"
    ).up_to_date


def test_karpathy_cli_wrong_format_is_one_line(tmp_path):
    (tmp_path / "imgs").mkdir()
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps([1, 2]))
    out = run_cli(
        "data",
        "karpathy",
        str(path),
        "--images",
        str(tmp_path / "imgs"),
        "--out",
        str(tmp_path / "ds"),
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        == f"cots data: error: {path} is not a Karpathy split file (expected an 'images' list)"
    )
