"""Momentum update, paired queues, schedule: against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.objectives.momentum import MomentumEncoder
from training.objectives.queues import PairQueue
from training.schedule import warmup_cosine


def test_momentum_update_matches_hand_computation():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    online[1].requires_grad_(False)  # frozen: must be left alone by the EMA
    ema = MomentumEncoder(online, momentum=0.9)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        online[0].weight.add_(1.0)
        online[0].bias.sub_(2.0)
        online[1].weight.add_(5.0)  # frozen parameter changed behind the EMA's back
        online[1].running_mean.fill_(3.0)
    ema.update(online)
    got = ema.model.state_dict()
    expected_w = 0.9 * before["0.weight"] + 0.1 * online[0].weight
    assert torch.allclose(got["0.weight"], expected_w)
    assert torch.allclose(got["0.bias"], 0.9 * before["0.bias"] + 0.1 * online[0].bias)
    assert torch.equal(got["1.weight"], before["1.weight"])  # frozen: skipped
    assert torch.equal(got["1.running_mean"], torch.full((2,), 3.0))  # buffers copied
    assert not any(p.requires_grad for p in ema.model.parameters())
    ema.train()
    assert not ema.model.training


def test_queue_shared_pointer_and_wraparound():
    queue = PairQueue(size=5, dim=2)
    assert queue.image_keys().shape == (0, 2)

    def pair_keys(ids):  # image key (i, 0), text key (i, 1): row k tells which pair it holds
        ids = torch.tensor(ids, dtype=torch.float)
        return torch.stack([ids, torch.zeros_like(ids)], 1), torch.stack([ids, ids + 100], 1)

    queue.enqueue(*pair_keys([1, 2, 3]))
    assert int(queue.ptr) == 3 and queue.image_keys().shape == (3, 2)
    queue.enqueue(*pair_keys([4, 5, 6]))  # wraps: 6 overwrites row 0
    assert int(queue.ptr) == 1 and int(queue.filled) == 5
    assert queue.image[:, 0].tolist() == [6, 2, 3, 4, 5]
    assert torch.equal(queue.image[:, 0], queue.text[:, 0])  # same pair in row k of both
    assert queue.text[:, 1].tolist() == [106, 102, 103, 104, 105]
    queue.enqueue(*pair_keys([7, 8, 9, 10, 11, 12, 13]))  # more than the queue holds
    assert sorted(queue.image[:, 0].tolist()) == [9, 10, 11, 12, 13]
    assert torch.equal(queue.image[:, 0], queue.text[:, 0])
    assert queue.image[int(queue.ptr) - 1, 0] == 13  # the newest sits just behind the pointer
    with pytest.raises(ValueError, match="key shapes differ"):
        queue.enqueue(torch.zeros(2, 2), torch.zeros(3, 2))


def test_warmup_cosine():
    assert warmup_cosine(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(10, 1.0, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 1.0, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 1.0, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.1)
    mid = 0.1 + 0.45 * (1 + math.cos(math.pi * 0.25))
    assert warmup_cosine(35, 1.0, 10, 110, min_lr_ratio=0.1) == pytest.approx(mid)
