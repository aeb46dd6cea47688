"""Speed options through the real trainer: compile and checkpointing switches, fused AdamW
(CUDA only), the channels-last CNN, the loader wait in the metrics."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_OVERRIDES

from training.config import load_config
from training.model import build_model, load_preset
from training.run import prepare
from training.trainer import build_optimizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _trainer(gallery, tmp_path, *extra: str):
    cfg = load_config("cots", [*TINY_OVERRIDES, "train.max_steps=2", "train.log_every=1", *extra])
    return prepare(cfg, gallery, tmp_path / "run")


@pytest.mark.slow
def test_compiled_towers_train_a_step(gallery, tmp_path):
    # aot_eager traces forward and backward as inductor would, without its slow C++ codegen
    # (inductor took minutes for the tiny towers on this 2-core CPU).
    trainer = _trainer(gallery, tmp_path, "train.compile=true", "train.compile_backend=aot_eager")
    towers = [trainer.model.image_tower, trainer.model.text_tower]
    towers += [trainer.objectives.memory.encoder.model.text_tower]
    assert all(t._compiled_call_impl is not None for t in towers)
    keys = set(build_model(trainer.model.config, load_weights=False).state_dict())
    assert set(trainer.model.state_dict()) == keys  # checkpoints keep their names
    logs = trainer.fit()
    assert torch.isfinite(torch.tensor(logs["loss"])) and trainer.step == 2


def test_checkpointing_switch_reaches_the_transformer_towers(gallery, tmp_path):
    trainer = _trainer(gallery, tmp_path, "train.checkpointing=true")
    assert trainer.model.image_tower.checkpointing and trainer.model.text_tower.checkpointing
    assert trainer.objectives.memory.encoder.model.text_tower.checkpointing
    assert trainer.fit()["loss"] > 0


def test_metrics_record_the_loader_wait(gallery, tmp_path):
    trainer = _trainer(gallery, tmp_path)
    trainer.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    train = [json.loads(line) for line in lines if '"train"' in line]
    assert len(train) == 2
    for record in train:
        assert record["data_wait_s"] >= 0 and 0 <= record["data_wait_frac"] <= 1
        assert record["pairs_per_s"] > 0


def test_plain_adamw_on_cpu_and_a_channels_last_cnn():
    model = build_model(load_preset("tiny"), load_weights=False)
    assert not build_optimizer(model, load_config("cots", [])).defaults["fused"]
    lite = build_model(load_preset("lite")).image_tower  # pretrained weights loaded into it
    assert lite._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert lite._blocks[3]._depthwise_conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@cuda
def test_fused_adamw_and_channels_last_on_cuda():
    device = torch.device("cuda")
    model = build_model(load_preset("lite"), load_weights=False).to(device)
    assert build_optimizer(model, load_config("cots", [])).defaults["fused"]
    assert model.image_tower._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tokens = model.image_features(torch.randn(2, 3, 224, 224, device=device))["tokens"]
    assert tokens.shape == (2, 49, 1280)
