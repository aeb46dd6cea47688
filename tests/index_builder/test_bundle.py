"""Bundle format: write, load, validate; corrupt and incomplete bundles are refused."""

from __future__ import annotations

import json
import os
import stat

import pytest
from tiny_bundles import WORDS, make_tiny_bundle, make_tokenizer

from index_builder.backends.base import check_bundle
from index_builder.bundle import (
    BUNDLE_JSON,
    IMAGE_ONNX,
    TEXT_ONNX,
    TOKENIZER_JSON,
    Bundle,
    bundle_id_of,
)
from index_builder.preprocess import sha256_file


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


def _edit_info(bundle_dir, **changes) -> dict:
    path = bundle_dir / BUNDLE_JSON
    info = json.loads(path.read_text())
    info.update(changes)
    path.write_text(json.dumps(info))
    return info


def test_a_replaced_file_with_its_hash_updated_is_refused(tiny_bundle, tmp_path):
    """Issue 17: swapping tokenizer.json and fixing its sha256 in bundle.json, bundle_id kept,
    passed the start-up check. The id follows from the content, so it no longer matches."""
    other = make_tokenizer(tmp_path / "other.json", list(reversed(WORDS)))
    (tiny_bundle.path / TOKENIZER_JSON).write_bytes(other.read_bytes())
    files = {**tiny_bundle.info["files"], TOKENIZER_JSON: sha256_file(other)}
    _edit_info(tiny_bundle.path, files=files)
    with pytest.raises(ValueError, match="bundle_id .* does not follow from its content"):
        Bundle.load(tiny_bundle.path)
    with pytest.raises(ValueError, match="does not follow from its content"):
        Bundle.load(tiny_bundle.path, verify=False)  # cheap: no file is read


@pytest.mark.parametrize(
    "change",
    [
        {"embed_dim": 9},
        {"image_spec": {"size": 8, "resize": 9}},
        {"text_spec": {"context_length": 9}},
        {"bundle_id": "0123456789abcdef"},
    ],
)
def test_every_described_field_is_covered_by_the_id(tiny_bundle, change):
    info = json.loads((tiny_bundle.path / BUNDLE_JSON).read_text())
    for key, value in change.items():
        info[key] = {**info[key], **value} if isinstance(value, dict) else value
    (tiny_bundle.path / BUNDLE_JSON).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="does not follow from its content"):
        Bundle.load(tiny_bundle.path)


def test_a_consistently_edited_bundle_gets_a_new_id_and_old_indexes_refuse_it(tiny_bundle):
    other_spec = {**tiny_bundle.info["image_spec"], "interpolation": "bilinear"}
    hashes = tiny_bundle.info["files"]
    specs = {"image_spec": other_spec, "text_spec": tiny_bundle.info["text_spec"]}
    new_id = bundle_id_of(hashes, tiny_bundle.embed_dim, specs)
    _edit_info(tiny_bundle.path, image_spec=other_spec, bundle_id=new_id)
    edited = Bundle.load(tiny_bundle.path)
    assert edited.bundle_id == new_id != tiny_bundle.bundle_id
    info = {"bundle_id": tiny_bundle.bundle_id, "embed_dim": tiny_bundle.embed_dim}
    with pytest.raises(ValueError, match="was built with bundle"):
        check_bundle(edited, info, "v000001-20250101T000000Z")
