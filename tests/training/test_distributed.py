"""Two real CPU processes on gloo: the gathers, and DDP training with identical queues."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world: int, port: int, gallery: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from conftest import TINY_OVERRIDES

    from training import distributed
    from training.config import load_config
    from training.objectives.clip import ClipLoss
    from training.run import prepare

    cfg = load_config("cots", [*TINY_OVERRIDES, "train.max_steps=3", "contrast.queue_size=24"])
    trainer = prepare(cfg, gallery, out)
    # the gather path: each rank's ClipLoss over its half; their mean is the full-batch loss
    full = torch.nn.functional.normalize(
        torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    half = slice(4 * rank, 4 * rank + 4)
    local = ClipLoss()(full[half], full.flip(0)[half], torch.tensor(0.1))
    trainer.fit()
    objectives = trainer.objectives
    torch.save(
        {
            "clip_local": local.detach(),
            "queue": objectives.memory.queue.state_dict(),
            "model": objectives.model.state_dict(),
            "momentum": objectives.memory.encoder.state_dict(),
            "step": trainer.step,
        },
        Path(out) / f"rank{rank}.pt",
    )
    distributed.destroy()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_process_ddp_training(gallery, tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(gallery), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["step"] == r1["step"] == 3
    # 3 steps x 2 ranks x 8 keys = 48 keys through a queue of 24: wrapped, both ranks agree
    assert int(r0["queue"]["filled"]) == 24 and int(r0["queue"]["ptr"]) == 0
    for key in ("image", "text", "ptr"):
        assert torch.equal(r0["queue"][key], r1["queue"][key]), key
    assert not torch.equal(r0["queue"]["image"][:8], r0["queue"]["image"][8:16])
    for name in r0["model"]:
        assert torch.allclose(r0["model"][name], r1["model"][name], atol=1e-6), name
    for name in r0["momentum"]:
        assert torch.allclose(r0["momentum"][name], r1["momentum"][name], atol=1e-6), name
    # gather path: mean of the per-rank losses == single-process loss on the whole batch
    from training.objectives.clip import ClipLoss

    full = torch.nn.functional.normalize(
        torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    whole = ClipLoss()(full, full.flip(0), torch.tensor(0.1))
    assert float((r0["clip_local"] + r1["clip_local"]) / 2) == pytest.approx(float(whole), rel=1e-5)
    assert (tmp_path / "checkpoints" / "last" / "trainer.pt").is_file()
