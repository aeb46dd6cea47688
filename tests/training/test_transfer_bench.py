"""bench/transfer.py: every checkpoint on every gallery, summarised over seeds."""

from __future__ import annotations

import json

import pytest
import torch

from bench import transfer
from training.checkpoint import save_checkpoint
from training.model import build_model, load_preset


def test_every_run_on_every_gallery_with_mean_and_std(gallery, tmp_path, capsys):
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(load_preset("tiny"))
        save_checkpoint(tmp_path / f"run{seed}" / "checkpoints" / "best", model, {"step": seed})
    out = tmp_path / "transfer.json"
    runs = [f"--run=tiny:{s}={tmp_path / f'run{s}'}" for s in (0, 1)]
    evals = [f"--eval=shapes:test={gallery}", f"--eval=shapes-all:all={gallery}"]
    assert transfer.main([*runs, *evals, f"--out={out}"]) == 0
    result = json.loads(out.read_text())
    assert [(r["seed"], r["gallery"]) for r in result["runs"]] == [
        (0, "shapes"),
        (0, "shapes-all"),
        (1, "shapes"),
        (1, "shapes-all"),
    ]
    assert result["runs"][1]["metrics"]["images"] == 48  # every split of the gallery
    (row,) = [r for r in result["summary"] if r["gallery"] == "shapes"]
    values = [r["metrics"]["rsum"] for r in result["runs"] if r["gallery"] == "shapes"]
    assert row["rsum"] == pytest.approx(sum(values) / 2)
    assert row["rsum_std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert "i2i_map" not in row and "t2t_map" in row  # the shapes gallery has no categories
    assert "| shapes | tiny |" in capsys.readouterr().out


def test_a_malformed_spec_is_refused():
    with pytest.raises(SystemExit, match="must look like NAME:X=PATH"):
        transfer.main(["--run=tiny=somewhere", "--eval=a:test=b"])


def test_pretrained_towers_reference_row(gallery, tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best", build_model(load_preset("tiny")), {})
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("model: {preset: tiny}\n")
    out = tmp_path / "transfer.json"
    args = [f"--run=tiny:0={tmp_path / 'run'}", f"--eval=shapes:test={gallery}"]
    assert transfer.main([*args, f"--pretrained={recipe}", f"--out={out}"]) == 0
    rows = {r["recipe"]: r for r in json.loads(out.read_text())["summary"]}
    reference = rows[f"pretrained towers ({recipe})"]
    assert "t2t_map" in reference and "rsum" not in reference  # unimodal only
    assert f"| shapes | pretrained towers ({recipe}) | - |" in capsys.readouterr().out
