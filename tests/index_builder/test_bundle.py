"""Bundle format: write, load, validate; corrupt and incomplete bundles are refused."""

from __future__ import annotations

import json
import os
import stat

import pytest
from tiny_bundles import make_tiny_bundle

from index_builder.bundle import BUNDLE_JSON, IMAGE_ONNX, TEXT_ONNX, Bundle


def test_write_then_load_round_trips(tiny_bundle):
    loaded = Bundle.load(tiny_bundle.path)
    assert loaded == tiny_bundle
    assert loaded.embed_dim == 8 and loaded.image_spec.size == 8
    assert loaded.text_spec.context_length == 8 and loaded.opset == 17
    assert loaded.info["source"] == {"checkpoint": "synthetic"}
    assert not list(tiny_bundle.path.parent.glob(".bundle.*.tmp"))


def test_bundle_is_readable_by_other_users(tmp_path):
    """A serving container runs as its own user (uid 10001), not as the one who exported."""
    old = os.umask(0o022)
    try:
        bundle = make_tiny_bundle(tmp_path / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE(bundle.path.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in bundle.path.iterdir()} == {0o644}


def test_bundle_id_is_a_content_hash(tmp_path):
    a = make_tiny_bundle(tmp_path / "a", seed=0)
    b = make_tiny_bundle(tmp_path / "b", seed=0)
    c = make_tiny_bundle(tmp_path / "c", seed=1)
    assert a.bundle_id == b.bundle_id != c.bundle_id


def test_rewriting_replaces_the_bundle_whole(tmp_path):
    first = make_tiny_bundle(tmp_path / "b", seed=0)
    second = make_tiny_bundle(tmp_path / "b", seed=1)
    assert Bundle.load(tmp_path / "b").bundle_id == second.bundle_id != first.bundle_id
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".b.")) == []


def test_corrupt_onnx_is_refused(tiny_bundle):
    (tiny_bundle.path / IMAGE_ONNX).write_bytes(b"not a model")
    with pytest.raises(ValueError, match="does not match the sha256"):
        Bundle.load(tiny_bundle.path)


def test_missing_file_and_missing_bundle(tiny_bundle, tmp_path):
    (tiny_bundle.path / TEXT_ONNX).unlink()
    with pytest.raises(FileNotFoundError, match="missing text_encoder.onnx"):
        Bundle.load(tiny_bundle.path)
    with pytest.raises(FileNotFoundError, match="bundle.json is missing"):
        Bundle.load(tmp_path / "nowhere")


def test_wrong_format_version(tiny_bundle):
    path = tiny_bundle.path / BUNDLE_JSON
    info = json.loads(path.read_text())
    info["format_version"] = 99
    path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="format_version 99"):
        Bundle.load(tiny_bundle.path)
