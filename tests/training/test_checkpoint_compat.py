"""Checkpoints written before the objectives became a package (and before COOKIE) still load.

The fixture records, for a tiny run with every COTS unit on (amf, instance, kl, mvlm with a
visual tokenizer), what that code wrote: the checkpoint's metadata, the name, shape and dtype
of every tensor in model.safetensors and trainer.pt, and the optimiser's parameter groups. The
test rebuilds such a checkpoint (random values, the recorded layout) and loads and resumes it
with the current code, so a renamed parameter or buffer anywhere fails here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from training.checkpoint import TOKENIZER, TRAINER, WEIGHTS, load_model
from training.config import from_dict
from training.run import LAST, prepare
from training.visual_tokenizer.model import TokenizerConfig, VisualTokenizer, save_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_before_objectives_package.json"


def tensors(layout: dict[str, list], seed: int) -> dict[str, torch.Tensor]:
    """Random floats (zeros for integer and bool buffers) of the recorded shapes and dtypes."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype) in layout.items():
        kind = getattr(torch, dtype)
        if kind.is_floating_point:
            out[name] = torch.randn(shape, generator=gen).to(kind) * 0.02
        else:
            out[name] = torch.zeros(shape, dtype=kind)
    return out


def write_old_checkpoint(layout: dict, path: Path, tokenizer_dir: Path) -> dict:
    """The checkpoint directory the pre-move code wrote; returns its train config."""
    from index_builder.preprocess import default_tokenizer_json

    path.mkdir(parents=True)
    meta = layout["meta"]
    meta["train_config"]["objectives"]["mvlm"]["tokenizer"] = str(tokenizer_dir)
    save_file(tensors(layout["model"], 0), path / WEIGHTS, metadata={"cots": json.dumps(meta)})
    (path / TOKENIZER).write_bytes(default_tokenizer_json().read_bytes())
    optimizer_state = {int(i): tensors(s, 1 + int(i)) for i, s in layout["optimizer_state"].items()}
    for state in optimizer_state.values():
        state["step"].fill_(float(layout["step"]))
        state["exp_avg_sq"].abs_()
    groups = [{**g, "betas": tuple(g["betas"])} for g in layout["optimizer_groups"]]
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    trainer_state = {
        "step": layout["step"],
        "best": None,
        "optimizer": {"state": optimizer_state, "param_groups": groups},
        "scaler": {},
        "objectives": {
            "modules": tensors(layout["objectives_modules"], 2),
            "memory": {
                "encoder": tensors(layout["memory_encoder"], 3),
                "queue": tensors(layout["memory_queue"], 4),
            },
        },
        "rng": [rng],
        "config": meta["train_config"],
    }
    torch.save(trainer_state, path / TRAINER)
    return meta["train_config"]


def test_a_checkpoint_written_before_the_move_loads_and_resumes(gallery, tmp_path):
    layout = json.loads(FIXTURE.read_text())
    tokenizer_dir = tmp_path / "tokenizer"
    spec = layout["meta"]["image_spec"]
    save_tokenizer(
        tokenizer_dir,
        VisualTokenizer(TokenizerConfig(**layout["tokenizer_config"])),
        {"image_spec": spec},
    )
    run = tmp_path / "run"
    config = write_old_checkpoint(layout, run / LAST, tokenizer_dir)

    model, meta = load_model(run / LAST)  # strict: every tensor name and shape must fit
    assert meta["step"] == layout["step"]
    assert sorted(model.state_dict()) == sorted(layout["model"])

    cfg = from_dict({**config, "train": {**config["train"], "max_steps": layout["step"] + 1}})
    trainer = prepare(cfg, gallery, run, resume=True)
    assert trainer.step == layout["step"]
    saved = sorted(layout["objectives_modules"])
    assert sorted(trainer.objectives.extra_state()["modules"]) == saved
    trainer.fit()
    assert trainer.step == layout["step"] + 1
