"""`cots train` / `cots eval` through the real entry point, and their one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES, make_gallery

from index_builder.cli import main
from training.checkpoint import read_meta


def test_train_then_eval(gallery, tmp_path):
    out = tmp_path / "run"
    code = main(
        ["train", "cots", "train.max_steps=6", "--data", str(gallery), "--out", str(out)]
        + [f"--set={o}" for o in TINY_OVERRIDES]
        + ["--set", "train.eval_every=3"]
    )
    assert code == 0
    for name in ("config.json", "metrics.jsonl", "loss.png", "recall.png"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints/best/model.safetensors").is_file()
    assert (out / "checkpoints/last/trainer.pt").is_file()
    assert read_meta(out / "checkpoints/best")["chosen_by"] == "val rsum"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [3, 6]
    assert all("loss/instance" in r and "pairs_per_s" in r for r in records if r["kind"] == "train")
    assert json.loads((out / "config.json").read_text())["model"]["preset"] == "tiny"

    metrics = tmp_path / "metrics.json"
    ckpt = out / "checkpoints" / "best"
    assert (
        main(["eval", "--checkpoint", str(ckpt), "--data", str(gallery), "--out", str(metrics)])
        == 0
    )
    result = json.loads(metrics.read_text())
    assert result["images"] == 6 and result["captions"] == 12
    assert 0.0 <= result["i2t_r1"] <= 100.0 and result["split"] == "test"


def test_train_without_val_split_writes_best_as_the_last_step(tmp_path, capsys):
    data = make_gallery(tmp_path / "no-val", per_split=(36, 0, 6))
    out = tmp_path / "run"
    args = ["train", "cots", "--data", str(data), "train.max_steps=2", "--out", str(out)]
    assert main([*args, *TINY_OVERRIDES]) == 0
    printed = capsys.readouterr().out
    assert f"no 'val' split in {data}: the best checkpoint is the last step" in printed
    [paths] = [line for line in printed.splitlines() if line.startswith("checkpoints: ")]
    best, last = (Path(p) for p in paths.removeprefix("checkpoints: ").split())
    assert read_meta(best)["chosen_by"] == "last step (no validation split)"
    assert read_meta(best)["step"] == read_meta(last)["step"] == 2
    assert "chosen_by" not in read_meta(last)


def cli(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "index_builder.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(gallery, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    args = ["train", "clip", "train.max_steps=1", "data.val_split=test", *TINY_OVERRIDES]
    assert main([*args, "--data", str(gallery), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.preset=huge"], "unknown preset 'huge'"),
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (
            ["contrast.queue_size=36"],
            "contrast.queue_size=36 must be smaller than the 36 training pairs",
        ),
        (["model.options.image_sise=3"], "unknown model config key(s): image_sise"),
    ],
)
def test_bad_train_input_is_one_line(gallery, tmp_path, extra, message):
    args = ["train", "cots", *TINY_OVERRIDES, *extra]
    result = cli(*args, "--data", str(gallery), "--out", str(tmp_path / "r"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cots train: error: "), result.stderr
    assert message in lines[0]
    assert not (tmp_path / "r").exists()  # failed before any work


def test_missing_dataset_and_foreign_checkpoint(gallery, tmp_path, tiny_checkpoint):
    result = cli("train", "cots", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "no dataset manifest" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # resuming a tiny run with the lite preset: another architecture
    overrides = [f"--set={o}" for o in TINY_OVERRIDES if not o.startswith("model.")]
    result = cli(
        "train",
        "clip",
        "--data",
        str(gallery),
        "--out",
        str(tiny_checkpoint),
        "--resume",
        *overrides,
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "holds another architecture" in line and "'tiny'" in line
    # a fresh run into a directory that already holds one
    overrides = [f"--set={o}" for o in TINY_OVERRIDES]
    result = cli("train", "clip", "--data", str(gallery), "--out", str(tiny_checkpoint), *overrides)
    assert result.returncode == 2 and "pass --resume" in result.stderr


def test_eval_bad_checkpoint(gallery, tmp_path):
    result = cli("eval", "--checkpoint", str(tmp_path), "--data", str(gallery))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"cots eval: error: no checkpoint at {tmp_path} (missing model.safetensors)"
    )
