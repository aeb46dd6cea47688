"""`cots index` end to end on a tiny bundle: build, search, add, info, rebuild exit codes."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
from tiny_bundles import make_gallery, make_tiny_bundle

from index_builder.backends.faiss import faiss_index
from index_builder.backends.faiss.store import IndexStore
from index_builder.bundle import IMAGE_ONNX, Bundle
from index_builder.cli import build_parser, main, parse
from index_builder.encoders import TextEncoder


def _build(bundle, data, out, *extra):
    return main(["index", "build", str(out), "--bundle", str(bundle), "--data", str(data),
                 "--threads", "1", "--shard-size", "5", "--cpu", *extra])  # fmt: skip


def test_build_search_info(tmp_path, tiny_bundle, gallery, capsys):
    out = tmp_path / "idx"
    assert _build(tiny_bundle.path, gallery, out, "--target-recall", "0.9") == 0
    printed = capsys.readouterr().out
    assert "is current under" in printed
    assert "chosen: 12 vectors: exact search (below 10,000)" in printed  # what and why
    loaded = IndexStore(out).open(bundle=Bundle.load(tiny_bundle.path))
    sides = loaded.info["sides"]
    assert sides["image"]["factory"] == "Flat" and sides["image"]["count"] == 12
    assert sides["text"]["count"] == 24 and sides["image"]["recall_at_10"] == 1.0
    assert loaded.info["dataset"]["name"] == "tiny"
    assert loaded.info["bundle_path"] == str(tiny_bundle.path.resolve())
    assert not list((out / "work").glob("*"))  # embeddings live in the index now
    query = TextEncoder(tiny_bundle).encode(["a red cat"])
    scores, rows = loaded.search("image", query, 3)
    images = np.stack([np.asarray(loaded.indexes["image"].reconstruct(i)) for i in range(12)])
    np.testing.assert_array_equal(rows[0], np.argsort(-(images @ query[0]), kind="stable")[:3])
    assert main(["index", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"* {loaded.version}" in text and "recall@10 1.000 (text queries)" in text
    assert main(["index", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle_id"] == tiny_bundle.bundle_id


def test_explicit_factory_and_add(tmp_path, tiny_bundle, gallery, capsys):
    out = tmp_path / "idx"
    assert _build(tiny_bundle.path, gallery, out, "--factory", "HNSW8") == 0
    first = IndexStore(out).current()
    more = make_gallery(tmp_path / "more", n=4, prefix="m")
    args = ["index", "add", "--bundle", str(tiny_bundle.path), "--data", str(more)]
    assert main([*args, str(out)]) == 0
    loaded = IndexStore(out).open()
    assert loaded.info["parent"] == first and len(loaded.images) == 16 and len(loaded.texts) == 32
    assert loaded.info["sides"]["image"]["factory"] == "HNSW8"
    assert loaded.info["bundle_path"] == str(tiny_bundle.path.resolve())
    capsys.readouterr()
    second = IndexStore(out).current()
    assert main([*args, str(out)]) == 0  # the same ids again: skipped, no new version
    said = capsys.readouterr().out
    assert "already present (skipped; --upsert replaces): 4 images, 8 texts" in said
    assert IndexStore(out).current() == second


def test_add_with_another_bundle_is_refused(tmp_path, tiny_bundle, gallery, capsys):
    out = tmp_path / "idx"
    assert _build(tiny_bundle.path, gallery, out) == 0
    other = make_tiny_bundle(tmp_path / "other", dim=12, seed=3)
    more = make_gallery(tmp_path / "more", n=2, prefix="m")
    args = ["index", "add", str(out), "--bundle", str(other.path), "--data", str(more)]
    assert main(args) == 2
    assert "embeds in 12 dimensions" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("corrupt", "does not match the sha256"),
        ("empty", "empty gallery"),
        ("factory", "FAISS rejects the factory string"),
        ("no-bundle", "bundle.json is missing"),
    ],
)
def test_rebuild_bad_input_exits_2_and_keeps_current(
    tmp_path, tiny_bundle, gallery, capsys, breakage, message
):
    out = tmp_path / "idx"
    assert _build(tiny_bundle.path, gallery, out) == 0
    before = IndexStore(out).current()
    capsys.readouterr()
    bundle, extra = tiny_bundle.path, []
    if breakage == "corrupt":
        (bundle / IMAGE_ONNX).write_bytes(b"garbage")
    elif breakage == "empty":
        extra = ["--split", "val"]
    elif breakage == "factory":
        extra = ["--factory", "IVF,Nonsense"]
    else:
        bundle = tmp_path / "missing"
    args = ["index", "rebuild", str(out), "--bundle", str(bundle), "--data", str(gallery)]
    assert main([*args, "--cpu", *extra]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert message in last and last.startswith("cots index rebuild: error:")
    assert "Traceback" not in err
    assert IndexStore(out).current() == before and IndexStore(out).versions() == [before]


def test_rebuild_disk_full_exits_1_and_keeps_current(
    tmp_path, tiny_bundle, gallery, capsys, monkeypatch
):
    out = tmp_path / "idx"
    assert _build(tiny_bundle.path, gallery, out) == 0
    before = IndexStore(out).current()
    capsys.readouterr()

    def full(index, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(faiss_index, "write_index", full)
    args = ["index", "rebuild", "--bundle", str(tiny_bundle.path), "--data", str(gallery)]
    assert main([*args, str(out), "--cpu"]) == 1
    assert "cots index rebuild: failed: [Errno 28] No space left" in capsys.readouterr().err
    assert IndexStore(out).current() == before
    monkeypatch.undo()
    assert main([*args, str(out), "--cpu"]) == 0
    assert IndexStore(out).current() != before


def test_bad_memory_budget(tmp_path, tiny_bundle, gallery, capsys):
    assert _build(tiny_bundle.path, gallery, tmp_path / "idx", "--memory-budget", "lots") == 2
    assert "not a size: 'lots'" in capsys.readouterr().err


def test_switch_rolls_current_back_and_forth(tmp_path, tiny_bundle, gallery, capsys):
    out = tmp_path / "idx"
    assert _build(tiny_bundle.path, gallery, out) == 0
    first = IndexStore(out).current()
    assert _build(tiny_bundle.path, gallery, out) == 0
    second = IndexStore(out).current()
    assert main(["index", "switch", str(out), first]) == 0
    assert IndexStore(out).current() == first and f"now names {first}" in capsys.readouterr().out
    for bad in ("../elsewhere", "v999999-20990101T000000Z"):
        assert main(["index", "switch", str(out), bad]) == 2
        assert "cots index: error:" in capsys.readouterr().err
    assert main(["index", "switch", str(out), second]) == 0
    assert IndexStore(out).current() == second


def _index_actions() -> dict:
    import argparse

    def subparsers(parser):
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return action.choices

    return subparsers(subparsers(build_parser())["index"])


# What each command needs besides the root, to parse.
REQUIRED = {"build": ["--bundle", "B"], "rebuild": ["--bundle", "B"], "add": ["--bundle", "B"]}


def test_every_index_command_names_the_root_the_same_way():
    """Every `cots index` command takes the index root as its first positional, ROOT, with
    the same help; none shows it as a flag (build, rebuild and add keep `--out` hidden)."""
    actions = _index_actions()
    assert set(actions) == {"build", "rebuild", "add", "delete", "switch", "info", "verify"}
    helps = set()
    for name, parser in actions.items():
        first = next(a for a in parser._actions if not a.option_strings)
        assert (first.dest, first.metavar) == ("root", "ROOT"), name
        helps.add(first.help)
        assert "--out" not in parser.format_help(), f"{name}: the root is ROOT, not a flag"
        argv = ["index", name, "R", *(["v1"] if name == "switch" else []), *REQUIRED.get(name, [])]
        assert parse(build_parser(), argv).root == "R", name
    assert len(helps) == 1


def test_out_is_a_deprecated_alias_of_the_root(tmp_path, tiny_bundle, gallery, caplog, capsys):
    out = tmp_path / "idx"
    args = ["index", "build", "--bundle", str(tiny_bundle.path), "--data", str(gallery)]
    assert main([*args, "--out", str(out), "--threads", "1", "--cpu"]) == 0
    assert IndexStore(out).current()
    assert "--out ROOT is deprecated" in caplog.text
    assert main([*args, str(out), "--out", str(tmp_path / "other")]) == 2
    assert "two index roots given" in capsys.readouterr().err
    assert main(args) == 2
    assert "give the index root: cots index build ROOT" in capsys.readouterr().err
