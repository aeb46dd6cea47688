"""ClipLoss and MomentumContrastLoss against naive per-sample Python loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.objectives.base import Temperature
from training.objectives.clip import ClipLoss
from training.objectives.instance import MomentumContrastLoss


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def naive_ce(scores: list[float], target: int) -> float:
    top = max(scores)
    return -(scores[target] - top - math.log(sum(math.exp(s - top) for s in scores)))


def dot(a, b):
    return float(sum(x * y for x, y in zip(a.tolist(), b.tolist(), strict=True)))


def test_momentum_contrast_matches_naive_loop():
    v, t, vk, tk = unit(4, 8, 0), unit(4, 8, 1), unit(4, 8, 2), unit(4, 8, 3)
    qv, qt = unit(6, 8, 4), unit(6, 8, 5)
    tau = torch.tensor(0.1)
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0])
    out = MomentumContrastLoss()(v, t, vk, tk, qv, qt, tau, weights)
    i2t, t2i = [], []
    for i in range(4):
        row = [dot(v[i], tk[i])] + [dot(v[i], qt[k]) for k in range(6)]
        i2t.append(naive_ce([s / 0.1 for s in row], 0))
        row = [dot(t[i], vk[i])] + [dot(t[i], qv[k]) for k in range(6)]
        t2i.append(naive_ce([s / 0.1 for s in row], 0))
    kept = [0, 2, 3]
    expected = (sum(i2t[i] for i in kept) / 3 + sum(t2i[i] for i in kept) / 3) / 2
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    assert out.logits_i2t.shape == (4, 7)
    assert float(out.logits_t2i[2, 0]) == pytest.approx(dot(t[2], vk[2]) / 0.1, rel=1e-5)
    # no queue yet: only the positive, loss 0
    empty = MomentumContrastLoss()(v, t, vk, tk, qv[:0], qt[:0], tau)
    assert float(empty.loss) == pytest.approx(0.0, abs=1e-6)


def test_clip_loss_matches_naive_loop():
    v, t = unit(5, 8, 6), unit(5, 8, 7)
    loss = ClipLoss()(v, t, torch.tensor(0.05))
    total = 0.0
    for i in range(5):
        total += naive_ce([dot(v[i], t[j]) / 0.05 for j in range(5)], i)
        total += naive_ce([dot(t[i], v[j]) / 0.05 for j in range(5)], i)
    assert float(loss) == pytest.approx(total / 10, rel=1e-5)


def test_clip_loss_fake_two_rank_gather(monkeypatch):
    """Rank 1 of 2 scores its rows against every rank's rows, positives offset by rank * B."""
    import training.objectives.clip as losses

    v, t = unit(6, 8, 8), unit(6, 8, 9)
    local = slice(3, 6)
    monkeypatch.setattr(losses, "world", lambda: (1, 2))
    monkeypatch.setattr(
        losses,
        "gather_with_local_grad",
        lambda x: torch.cat([(v if x is v_local else t)[:3], x]),
    )
    v_local, t_local = v[local], t[local]
    got = losses.ClipLoss()(v_local, t_local, torch.tensor(0.1))
    total = 0.0
    for i in range(3, 6):
        total += naive_ce([dot(v[i], t[j]) / 0.1 for j in range(6)], i)
        total += naive_ce([dot(t[i], v[j]) / 0.1 for j in range(6)], i)
    assert float(got) == pytest.approx(total / 6, rel=1e-5)


def test_temperature_is_clamped():
    temp = Temperature(0.07)
    with torch.no_grad():
        temp.tau.fill_(5.0)
    assert float(temp().detach()) == pytest.approx(0.5)
    temp.clamp_()
    assert float(temp.tau.detach()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outside"):
        Temperature(0.0001)
