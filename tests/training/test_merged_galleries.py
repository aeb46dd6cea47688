"""Several galleries as one (`cots data merge`), per-gallery weights and metrics, and the
`anchor` unit that keeps step 0's knowledge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, make_gallery
from test_semantic import small_config

from index_builder.cli import main
from index_builder.manifest import image_path, load_records
from training.evaluate import retrieval_metrics
from training.model import build_model
from training.objectives.anchor import AnchorObjective, distill_kl
from training.objectives.base import StepContext, Temperature
from training.sources import WeightedGalleries, check_weights, per_gallery_metrics


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    a = make_gallery(root / "a", (20, 4, 4))
    b = make_gallery(root / "b", (12, 4, 4))  # the same ids as a: skipped and counted
    c = make_gallery(root / "c", (16, 4, 4))
    for path, prefix in ((c, "c-"),):  # c's ids made unique
        lines = (path / "manifest.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        for row in rows:
            row["id"] = prefix + row["id"]
        (path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "mixed"
    assert main(["data", "merge", f"shapes={a}", f"dup={b}", f"scenes={c}", "--out", str(out)]) == 0
    return out


def test_merge_tags_records_and_points_at_images_in_place(merged):
    records = load_records(merged)
    galleries = {r.meta["gallery"] for r in records}
    assert galleries == {"shapes", "scenes"}  # every id of `dup` was taken by `shapes`
    assert len(records) == 28 + 24
    assert all(image_path(merged, r).is_file() for r in records)
    assert not (merged / "images").exists()  # nothing copied
    info = json.loads((merged / "dataset.json").read_text())
    assert info["skipped"] == {"id already taken by an earlier gallery": 20}


def test_merge_refuses_one_gallery_and_missing_ones(tmp_path, capsys):
    gallery = make_gallery(tmp_path / "g", (8, 2, 2))
    assert main(["data", "merge", str(gallery), "--out", str(tmp_path / "m")]) != 0
    assert "at least two" in capsys.readouterr().err
    assert main(["data", "merge", str(gallery), f"x={tmp_path / 'nope'}"]) != 0
    assert "nope" in capsys.readouterr().err


def test_weighted_galleries_draw_round_w_n_each_epoch():
    class Items:
        epoch = -1

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __getitem__(self, index):
            return index

    galleries = np.array(["a"] * 10 + ["b"] * 30 + ["c"] * 5)
    data = WeightedGalleries(Items(), galleries, {"a": 2.5, "b": 0.2}, seed=0)
    assert len(data) == 25 + 6 + 5
    first = [data[i] for i in range(len(data))]
    counts = {g: sum(galleries[i] == g for i in first) for g in "abc"}
    assert counts == {"a": 25, "b": 6, "c": 5}
    assert all(first.count(i) >= 2 for i in range(10))  # every 'a' at least twice
    data.set_epoch(1)
    assert data.dataset.epoch == 1
    assert sorted(data[i] for i in range(len(data))) != sorted(first)  # a fresh draw of 'b'
    with pytest.raises(ValueError, match="not in the dataset"):
        check_weights({"z": 1.0}, galleries)
    with pytest.raises(ValueError, match=">= 0"):
        check_weights({"a": -1.0}, galleries)


def test_per_gallery_metrics_score_each_gallery_alone():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(9, 8), dim=-1)
    owner = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 5])
    galleries = np.array(["x", "x", "x", "y", "y", "y"])
    metrics = per_gallery_metrics(image, text, owner, galleries)
    alone = retrieval_metrics(image[3:], text[4:], owner[4:] - 3)
    assert metrics["y/rsum"] == pytest.approx(alone["rsum"])
    assert {"x/t2i_r1", "y/i2t_r10"} <= set(metrics)
    assert per_gallery_metrics(image, text, owner, np.array([""] * 6)) == {}


def test_train_on_merged_galleries_reports_each(merged, tmp_path):
    out = tmp_path / "run"
    args = ["train", "cots", "--data", str(merged), "--out", str(out)]
    args += [f"--set={o}" for o in TINY_OVERRIDES]
    args += ["--set", "train.max_steps=4", "--set", "train.eval_every=4"]
    args += ["--set", "data.cache_frozen_features=true"]
    args += ["--set", "data.gallery_weights={shapes: 0.5}"]
    args += ["--set", "model.options.image_trainable_blocks=0"]
    args += ["--set", "model.options.text_trainable_blocks=0"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "val"][-1]
    assert {"shapes/rsum", "scenes/rsum", "rsum"} <= set(val)


def test_distill_kl_matches_its_definition():
    teacher, student = torch.randn(4, 4), torch.randn(4, 4)
    p, q = teacher.softmax(1), student.softmax(1)
    expected = (p * (p.log() - q.log())).sum(1).mean()
    assert distill_kl(student, teacher) == pytest.approx(float(expected), abs=1e-6)
    assert distill_kl(teacher, teacher) == pytest.approx(0.0, abs=1e-6)


def test_anchor_is_zero_at_step_zero_and_pulls_back_after(tmp_path):
    model = build_model(small_config(tmp_path, embed_dim=16))
    unit = AnchorObjective(model, teacher_temperature=0.05)
    batch = {
        "pixels": torch.randn(4, 3, 64, 64),
        "input_ids": torch.randint(1, 100, (4, 6)),
        "attention_mask": torch.ones(4, 6, dtype=torch.long),
    }
    tau = Temperature(0.05, learnable=False)
    start = float(unit(StepContext(batch, model, tau, None))["anchor"])
    assert start == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        model.text_proj.weight.add_(torch.randn_like(model.text_proj.weight) * 0.5)
    loss = unit(StepContext(batch, model, tau, None))["anchor"]
    assert loss > 1e-3
    loss.backward()
    assert model.text_proj.weight.grad is not None
    assert all(p.grad is None for p in unit.teacher.parameters())


def test_merged_features_come_from_each_gallerys_cache_entry(tmp_path):
    """A merge's tower outputs are its galleries' cache entries, concatenated: the same
    rows as encoding the merged split itself, and no new entry is written."""
    from index_builder.data.merge import MergeConfig, import_merge
    from training.feature_cache import FeatureStore, encode_split
    from training.model import load_preset

    a = make_gallery(tmp_path / "a", (10, 2, 2))
    b = make_gallery(tmp_path / "b", (8, 2, 2))
    lines = [json.loads(x) for x in (b / "manifest.jsonl").read_text().splitlines()]
    for row in lines:
        row["id"] = "b-" + row["id"]
    (b / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    merged = tmp_path / "m"
    import_merge(MergeConfig((("z", a), ("b", b))), merged)  # not in name order
    torch.manual_seed(0)
    model = build_model(load_preset("tiny")).eval()
    store = FeatureStore(tmp_path / "cache")
    feats = store.load(model, merged, "train", tokens=False)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one entry per gallery
    direct = encode_split(model, merged, "train", tokens=False)
    assert torch.allclose(feats.image_pooled, direct.image_pooled, atol=1e-5)
    assert torch.allclose(feats.text_pooled, direct.text_pooled, atol=1e-5)
    assert torch.equal(feats.owner, direct.owner)
    (a / "manifest.jsonl").write_text((a / "manifest.jsonl").read_text().replace("item-000", "z"))
    store.load(model, merged, "train", tokens=False)  # a stale merge: encoded on its own
    assert len(list((tmp_path / "cache").iterdir())) == 3
