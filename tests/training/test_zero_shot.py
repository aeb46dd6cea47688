"""`cots eval-zero-shot`: the metrics against hand-computed values, the packaged data the
suites read, and the command end to end on tiny bundles (no torch anywhere)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index_builder import cli
from training.zero_shot import metrics as M
from training.zero_shot import sources
from training.zero_shot.commands import register
from training.zero_shot.suites import FASHION_CLASSES

# The tiny-bundle builder of tests/index_builder (a plain module there, not a package).
_SHARED = str(Path(__file__).resolve().parents[1] / "index_builder")
if _SHARED not in sys.path:
    sys.path.append(_SHARED)
from tiny_bundles import make_gallery, make_tiny_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# Two queries over a gallery of four; hand-computed below.
SIMS = np.array([[0.9, 0.8, 0.7, 0.6], [0.1, 0.9, 0.5, 0.3]])
RELEVANT = np.array([[False, True, False, True], [True, False, False, False]])


def test_average_precision_by_hand():
    # query 0: hits at ranks 2 and 4 -> (1/2 + 2/4) / 2; query 1: its one hit is last -> 1/4
    assert M.average_precision(SIMS, RELEVANT) == pytest.approx([0.5, 0.25])
    assert M.precision_at_k(SIMS, RELEVANT, 2) == pytest.approx([0.5, 0.0])
    assert M.precision_at_k(SIMS, RELEVANT, 4) == pytest.approx([0.5, 0.25])


def test_first_hit_ranks_hits_and_mrr_by_hand():
    ranks = M.first_relevant_rank(SIMS, RELEVANT)
    assert ranks.tolist() == [1, 3]
    assert [M.hits_at(ranks, k) for k in (1, 2, 4)] == [0, 1, 2]
    assert M.mean_reciprocal_rank(ranks) == pytest.approx((1 / 2 + 1 / 4) / 2)
    # a tie goes against the query (a collapsed model scores nothing); nothing relevant: refused
    assert M.first_relevant_rank([[0.5, 0.5]], [[False, True]]).tolist() == [1]
    assert M.average_precision([[0.5, 0.5]], [[True, False]]) == pytest.approx([0.5])
    assert M.precision_at_k([[0.5, 0.5, 0.1]], [[True, False, True]], 1) == pytest.approx([0])
    with pytest.raises(ValueError, match="at least one relevant"):
        M.first_relevant_rank(SIMS, np.zeros_like(RELEVANT))


def test_recall_both_ways_with_two_captions_per_image_by_hand():
    images = np.eye(3)  # image i is the unit vector e_i
    texts = np.array([[0, 1, 0], [0.8, 0, 0.6], [0, 0.6, 0.8], [0, 0, 1]])
    owners = [0, 0, 1, 2]  # image 0 has two captions
    # t2i: caption 0 ranks its image (0) behind image 1 (1) and image 2 (0, a tie), caption 2
    # behind image 2 -> ranks 2,0,1,0; i2t: image 0's best caption (0.8) is first, image 1's
    # (0.6) is behind caption 0 (1.0), image 2's (1.0) is first -> ranks 0,1,0
    i2t, t2i = M.owner_ranks(images, texts, owners)
    assert i2t.tolist() == [0, 1, 0] and t2i.tolist() == [2, 0, 1, 0]
    got = M.recall_both_ways(images, texts, owners, ks=(1, 5))
    assert got == pytest.approx(
        {"i2t_r1": 200 / 3, "i2t_r5": 100.0, "t2i_r1": 50.0, "t2i_r5": 100.0, "rsum": 950 / 3}
    )
    with pytest.raises(ValueError, match="image index"):
        M.owner_ranks(images, texts, [0, 0, 1, 3])


def test_owner_ranks_match_a_naive_loop_across_chunks():
    rng = np.random.default_rng(0)
    images, texts = rng.standard_normal((7, 4)), rng.standard_normal((15, 4))
    owners = rng.integers(0, 7, 15)
    owners[:7] = np.arange(7)  # every image has a caption
    i2t, t2i = M.owner_ranks(images, texts, owners, chunk=3)
    sims = images @ texts.T
    for i in range(7):
        best = max(sims[i, j] for j in range(15) if owners[j] == i)
        assert i2t[i] == sum(s >= best for j, s in enumerate(sims[i]) if owners[j] != i)
    for j in range(15):
        others = [s for i, s in enumerate(sims[:, j]) if i != owners[j]]
        assert t2i[j] == sum(s >= sims[owners[j], j] for s in others)


def test_fashion_mnist_test_split_from_the_debian_package():
    images, labels = sources.fashion_mnist_test()
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * len(FASHION_CLASSES)
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]  # ankle boot, pullover, trousers, ...
    keep = sources.balanced_subset(labels, 3)
    assert np.bincount(labels[keep]).tolist() == [3] * 10
    assert keep.tolist() == sorted(keep.tolist()) and keep[0] == 0


def test_missing_data_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "FASHION_MNIST", tmp_path)
    with pytest.raises(sources.MissingData, match="apt-get install dataset-fashion-mnist"):
        sources.fashion_mnist_test(tmp_path)
    monkeypatch.setitem(sources.PIP, "scikit-image", ("no_such_module_zs", "data"))
    with pytest.raises(sources.MissingData, match="pip install scikit-image"):
        sources.skimage_photos()
    monkeypatch.setitem(sources.APT, "mate-backgrounds", tmp_path / "absent")
    with pytest.raises(sources.MissingData, match="apt-get install mate-backgrounds"):
        sources.package_dir("mate-backgrounds")


def test_packaged_photos_and_their_answers_exist():
    paths, captions = sources.skimage_photos()
    assert len(paths) == len(captions) >= 12 and all(p.is_file() for p in paths)
    assert "horse.png" not in {p.name for p in paths}  # a silhouette, not a photograph
    paths, queries, answers = sources.photo_folder()
    assert 35 <= len(paths) <= 45 and len(queries) >= 22
    assert all(p.is_file() for p in paths)
    named = {q: {paths[i].name for i in a} for q, a in zip(queries, answers, strict=True)}
    assert named["a cat"] == {"chelsea.png"}
    assert named["a woman in a navy uniform"] == {"grace_hopper.jpg"}
    assert len(named["a flower"]) > 1


def test_library_imports_no_torch():
    code = (
        "import sys, training.zero_shot, training.zero_shot.commands, "
        "training.zero_shot.report; assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr


@pytest.fixture
def cots(monkeypatch):
    """`cots` with this branch's subcommand, whether or not the installed entry points
    already list it."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "eval-zero-shot" not in sub.choices:
        register(sub)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    return cli.main


def test_cli_end_to_end_on_tiny_bundles(cots, tmp_path, capsys):
    a, b = make_tiny_bundle(tmp_path / "a", seed=0), make_tiny_bundle(tmp_path / "b", seed=1)
    gallery = make_gallery(tmp_path / "gallery", n=8)
    out = tmp_path / "report"
    argv = ["eval-zero-shot", "--bundle", f"first={a.path}", "--bundle", str(b.path)]
    argv += ["--out", str(out), "--data", f"tiny={gallery}", "--per-class", "2", "--threads", "1"]
    assert cots(argv) == 0
    assert capsys.readouterr().out.split() == [
        str(out / name) for name in ("zero_shot.json", "zero_shot.md", "zero_shot.png")
    ]
    report = json.loads((out / "zero_shot.json").read_text())
    assert report["command"].startswith("cots eval-zero-shot --bundle first=")
    assert "--suites fashion-mnist skimage photos gallery" in report["command"]
    suites = ["fashion-mnist", "skimage", "photos", "gallery:tiny"]
    assert sorted(report["results"]) == ["b", "first"]
    assert report["bundles"]["first"]["bundle_id"] == a.bundle_id
    for result in report["results"].values():
        assert sorted(result) == sorted(suites)
        assert 0 <= result["fashion-mnist"]["accuracy"] <= 100
        assert result["fashion-mnist"]["accuracy"] == result["fashion-mnist"]["i2t_r1"]
        assert set(result["skimage"]) == {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum"}
        assert result["photos"]["queries"] == len(report["suites"]["photos"]["data"]["queries"])
        assert 0 <= result["photos"]["r1_hits"] <= result["photos"]["r10_hits"]
        assert result["gallery:tiny"]["rsum"] >= 0
    assert report["suites"]["fashion-mnist"]["data"]["images"] == 20
    assert report["suites"]["gallery:tiny"]["data"]["captions"] == 16
    table = (out / "zero_shot.md").read_text()
    assert "| bundle | fashion-mnist (accuracy) | skimage (RSUM) |" in table
    assert table.index("\n| first |") < table.index("\n| b |")  # rows in command-line order
    assert table.count("\n| first |") == 2 + len(
        suites
    )  # summary, suites, bundles and "## gallery:tiny" in table
    assert (out / "zero_shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_bundle_path_is_one_line(cots, tmp_path, capsys):
    argv = ["eval-zero-shot", "--bundle", f"x={tmp_path / 'nope'}", "--out", str(tmp_path)]
    assert cots(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cots eval-zero-shot: error: no bundle at ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "zero_shot.json").exists()


def test_cli_missing_suite_data_is_one_line(cots, tmp_path, capsys, monkeypatch):
    bundle = make_tiny_bundle(tmp_path / "a")
    monkeypatch.setattr(sources, "FASHION_MNIST", tmp_path / "absent")
    argv = ["eval-zero-shot", "--bundle", str(bundle.path), "--out", str(tmp_path / "r")]
    assert cots([*argv, "--suites", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cots eval-zero-shot: error: ") and err.count("\n") == 1
    assert "apt-get install dataset-fashion-mnist" in err
    assert cots([*argv, "--suites", "gallery"]) == 2
    assert "needs a dataset: --data NAME=DIR" in capsys.readouterr().err
