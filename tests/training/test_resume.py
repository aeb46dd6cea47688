"""Kill a run mid-epoch and --resume it: it must end where the uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_OVERRIDES

from training.config import load_config
from training.run import prepare


class Killed(Exception):
    pass


def state_of(trainer):
    objectives = trainer.objectives
    return {
        "step": trainer.step,
        "weights": {k: v.clone() for k, v in objectives.model.state_dict().items()},
        "momentum": {k: v.clone() for k, v in objectives.memory.encoder.state_dict().items()},
        "queue": {k: v.clone() for k, v in objectives.memory.queue.state_dict().items()},
        "adam": [s["exp_avg"].clone() for s in trainer.optimizer.state.values()],
        "tau": objectives.temperature.tau.detach().clone(),
    }


def assert_close(a, b):
    assert a["step"] == b["step"]
    for key in ("weights", "momentum", "queue"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.allclose(a[key][name].float(), b[key][name].float(), atol=1e-6), (
                key,
                name,
            )
    assert len(a["adam"]) == len(b["adam"])
    assert all(torch.allclose(x, y, atol=1e-7) for x, y in zip(a["adam"], b["adam"], strict=True))
    assert torch.allclose(a["tau"], b["tau"])


def test_kill_and_resume_matches_straight_run(gallery, tmp_path):
    # 36 pairs / batch 8 -> 4 steps per epoch; the kill at step 3 is mid-epoch, 6 crosses one.
    cfg = load_config("cots", [*TINY_OVERRIDES, "train.max_steps=6", "train.eval_every=3"])
    straight = prepare(cfg, gallery, tmp_path / "straight")
    straight.fit()
    expected = state_of(straight)

    def kill_at_3(trainer):
        if trainer.step == 3:
            raise Killed

    victim = prepare(cfg, gallery, tmp_path / "resumed")
    victim.add_callback("on_step_end", kill_at_3)
    with pytest.raises(Killed):
        victim.fit()
    resumed = prepare(cfg, gallery, tmp_path / "resumed", resume=True)
    assert resumed.step == 3
    assert int(resumed.objectives.memory.queue.filled) == 16  # 3 steps x 8 keys, capped at 16
    resumed.fit()
    assert_close(state_of(resumed), expected)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines())
