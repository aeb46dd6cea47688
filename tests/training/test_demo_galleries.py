"""`cots demo --galleries`: which built-in galleries it builds, trains on and merges."""

from __future__ import annotations

import pytest

from index_builder import paths
from training.pipelines import demo


def test_gallery_names_and_the_training_data(monkeypatch, tmp_path):
    monkeypatch.setenv("COTS_HOME", str(tmp_path))
    assert demo.gallery_names("openclipart") == ["openclipart"]
    assert demo.training_data(["openclipart"]) == paths.dataset_dir("openclipart")
    both = demo.gallery_names(" openclipart, emoji ,")
    assert both == ["openclipart", "emoji"]
    assert demo.training_data(both) == paths.dataset_dir(demo.MERGED)
    for bad in ("", "coco", "openclipart,flickr"):
        with pytest.raises(ValueError, match="built-in gallery names"):
            demo.gallery_names(bad)


def test_build_galleries_builds_the_served_one_then_merges(monkeypatch, tmp_path):
    monkeypatch.setenv("COTS_HOME", str(tmp_path))
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(demo, "cots", lambda *argv: calls.append(tuple(map(str, argv))) or 0)
    assert demo.build_galleries(None, ["emoji", "synthetic"]) == 0
    assert [c[:2] for c in calls] == [
        ("data", "openclipart"),
        ("data", "emoji"),
        ("data", "synthetic"),
        ("data", "merge"),
    ]
    assert calls[-1][-1] == str(paths.dataset_dir(demo.MERGED))
    calls.clear()
    assert demo.build_galleries(None, ["openclipart"]) == 0
    assert calls == [("data", "openclipart", "--out", str(paths.dataset_dir("openclipart")))]
