"""`cots ablate` on the tiny preset: every rung trains, the table and chart are written,
and the COTS heads stay out of the saved model."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_OVERRIDES
from safetensors import safe_open

from index_builder.cli import main
from training.config import COOKIE_PAIRS
from training.model import build_model, load_preset
from training.pipelines.ablate import LADDERS, markdown_table

LADDER = LADDERS["cots"].rungs


@pytest.fixture(scope="module")
def ladder(gallery, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    sets = [*TINY_OVERRIDES, "train.max_steps=2", "objectives.amf.warmup=0"]
    sets += ["objectives.amf.min_history=4", "data.max_val_images=6"]
    args = ["ablate", "--data", str(gallery), "--out", str(out), "--tokenizer-steps", "3"]
    assert main(args + [f"--set={s}" for s in sets]) == 0
    return out


def test_every_rung_is_trained_and_tabulated(ladder):
    results = json.loads((ladder / "ablation.json").read_text())
    assert [r["rung"] for r in results] == list(LADDER)
    for r in results:
        assert r["steps"] == 2 and r["split"] == "test" and r["pairs_per_s"] > 0
        parts = [r[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")]
        assert r["rsum"] == pytest.approx(sum(parts))
    table = (ladder / "ablation.md").read_text()
    assert table == markdown_table(results) and table.count("\n") == 2 + len(LADDER)
    assert (ladder / "ablation.png").stat().st_size > 0
    assert (ladder / "tokenizer" / "reconstructions.png").is_file()
    cots = json.loads((ladder / "cots" / "metrics.jsonl").read_text().splitlines()[-2])
    assert {"loss/mlm", "loss/mvm", "loss/kl", "loss/instance", "amf_filtered"} <= set(cots)


def test_rungs_differ_only_in_their_objectives(ladder):
    configs = {}
    for rung in LADDER:
        config = json.loads((ladder / rung.replace("+", "plus-") / "config.json").read_text())
        configs[rung] = {k: v for k, v in config.items() if k not in ("name", "objectives")}
        enabled = {k for k, v in config["objectives"].items() if v["enabled"]}
        assert enabled == {s.split(".")[1] for s in LADDER[rung] if s.endswith("true")}
    assert all(c == configs["clip"] for c in configs.values())


def test_heads_stay_out_of_the_saved_model(ladder):
    """The checkpoint that export reads holds exactly the two towers and projections."""
    path = ladder / "cots" / "checkpoints" / "best" / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        saved = set(handle.keys())
    assert saved == set(build_model(load_preset("tiny"), load_weights=False).state_dict())
    assert not any("head" in key or "tokenizer" in key for key in saved)


def test_a_finished_ladder_is_not_retrained(ladder, gallery, capsys):
    before = (ladder / "instance" / "result.json").stat().st_mtime_ns
    args = ["ablate", "--data", str(gallery), "--out", str(ladder), "--rungs", "instance,+kl"]
    assert main(args) == 0
    assert (ladder / "instance" / "result.json").stat().st_mtime_ns == before
    assert "| +kl |" in capsys.readouterr().out


def test_unknown_rung_is_a_one_line_error(gallery, tmp_path, capsys):
    assert main(["ablate", "--data", str(gallery), "--out", str(tmp_path), "--rungs", "bert"]) == 2
    assert "unknown rung(s) bert" in capsys.readouterr().err


def test_several_seeds_give_mean_and_spread(gallery, tmp_path, capsys):
    sets = [*TINY_OVERRIDES, "train.max_steps=2", "data.max_val_images=6"]
    args = ["ablate", "--data", str(gallery), "--out", str(tmp_path), "--rungs", "clip,instance"]
    assert main([*args, "--seeds", "0,1", *[f"--set={s}" for s in sets]]) == 0
    per_seed = [json.loads((tmp_path / f"seed-{s}" / "ablation.json").read_text()) for s in (0, 1)]
    for seed, results in enumerate(per_seed):
        config = json.loads((tmp_path / f"seed-{seed}" / "clip" / "config.json").read_text())
        assert config["train"]["seed"] == seed and [r["rung"] for r in results] == [
            "clip",
            "instance",
        ]
    summary = json.loads((tmp_path / "ablation.json").read_text())
    for row, runs in zip(summary, zip(*per_seed, strict=True), strict=True):
        values = [r["t2i_r5"] for r in runs]
        assert row["t2i_r5"] == pytest.approx(sum(values) / 2)
        assert row["t2i_r5_std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
        assert row["rsum_per_seed"] == [r["rsum"] for r in runs] and row["seeds"] == [0, 1]
        instance = [r["rsum"] for r in per_seed_rung(per_seed, "instance")]
        deltas = [a - b for a, b in zip(row["rsum_per_seed"], instance, strict=True)]
        assert row["rsum_vs_instance"] == pytest.approx(deltas)
    table = (tmp_path / "ablation.md").read_text()
    assert table == markdown_table(summary) and " ± " in table and "RSUM per seed" in table
    assert (tmp_path / "ablation.png").stat().st_size > 0
    assert "RSUM per seed" in capsys.readouterr().out


def test_bad_seeds_are_a_one_line_error(gallery, tmp_path, capsys):
    args = ["ablate", "--data", str(gallery), "--out", str(tmp_path), "--rungs", "clip"]
    assert main([*args, "--seeds", "0,x"]) == 2
    assert "--seeds takes comma-separated integers" in capsys.readouterr().err


def per_seed_rung(per_seed, rung):
    return [next(r for r in results if r["rung"] == rung) for results in per_seed]


def test_cookie_ladder_adds_one_part_per_rung(gallery, tmp_path, capsys):
    """clip, +shared, +image-knowledge, +text-knowledge over cached frozen towers; the rungs
    differ only in the objectives and, for clip, in the shared transformer."""
    from safetensors.torch import save_file

    model = build_model(load_preset("tiny"))
    for side in ("image", "text"):
        state = {k: v.contiguous() for k, v in getattr(model, f"{side}_tower").state_dict().items()}
        save_file(state, tmp_path / f"{side}.safetensors")
    sets = [*TINY_OVERRIDES, "train.max_steps=2", "data.cache_frozen_features=true"]
    sets += [f"data.feature_store={tmp_path / 'features'}", "model.options.shared_width=16"]
    sets += [
        f"model.options.{side}_weights={tmp_path / side}.safetensors" for side in ("image", "text")
    ]
    sets += [f"model.options.{side}_trainable_blocks=0" for side in ("image", "text")]
    sets += ["model.options.shared_layers=1", "model.options.shared_heads=2"]
    out = tmp_path / "ladder"
    args = ["ablate", "--ladder", "cookie", "--base", "cots", "--data", str(gallery), "--out"]
    assert main([*args, str(out), *[f"--set={s}" for s in sets]]) == 0
    rungs = list(LADDERS["cookie"].rungs)
    assert rungs == ["clip", "+shared", "+image-knowledge", "+text-knowledge"]
    results = json.loads((out / "ablation.json").read_text())
    assert [r["rung"] for r in results] == rungs and all("t2t_map" in r for r in results)
    configs = {
        r: json.loads((out / r.replace("+", "plus-") / "config.json").read_text()) for r in rungs
    }
    assert configs["clip"]["model_config"]["shared_layers"] == 0
    assert configs["+shared"]["model_config"]["shared_layers"] == 1
    pairs = [configs[r]["objectives"]["cookie"]["pairs"] for r in rungs[1:]]
    assert [len(p) for p in pairs] == [1, 2, 3] and pairs[2] == [list(p) for p in COOKIE_PAIRS]
    assert configs["clip"]["objectives"]["clip"]["enabled"]
    assert not configs["clip"]["objectives"]["cookie"]["enabled"]
    same = [
        {k: v for k, v in c.items() if k not in ("name", "objectives", "model", "model_config")}
        for c in configs.values()
    ]
    assert all(c == same[0] for c in same)
    assert "| +text-knowledge |" in capsys.readouterr().out
