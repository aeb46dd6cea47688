"""The adaptive momentum filter on synthetic similarity streams."""

from __future__ import annotations

import pytest
import torch

from training.objectives.amf import AdaptiveMomentumFilter


def _stream(steps: int, batch: int = 32, noisy_every: int = 0, seed: int = 0):
    """Clean pairs ~ N(0.6, 0.05); every `noisy_every`-th pair ~ N(0.0, 0.05)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        sims = 0.6 + 0.05 * torch.randn(batch, generator=gen)
        noisy = torch.zeros(batch, dtype=torch.bool)
        if noisy_every:
            noisy[::noisy_every] = True
            sims[noisy] = 0.05 * torch.randn(int(noisy.sum()), generator=gen)
        yield sims, noisy


def test_keeps_everything_during_warmup():
    amf = AdaptiveMomentumFilter(size=64, lam=2.0, warmup=5, min_history=8)
    for step, (sims, _) in enumerate(_stream(5, noisy_every=2)):
        assert amf.threshold() is None, step
        assert torch.equal(amf(sims), torch.ones(32))
    assert amf.threshold() is not None


def test_threshold_is_mean_minus_lambda_std_of_the_fifo():
    amf = AdaptiveMomentumFilter(size=8, lam=1.5, warmup=0, min_history=4)
    history = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    for value in history:
        amf(value[None])
    last8 = history[-8:]  # the FIFO holds the 8 newest scores only
    expected = float(last8.mean() - 1.5 * last8.std())
    assert amf.threshold() == pytest.approx(expected)
    keep = amf(torch.tensor([expected - 1e-3, expected + 1e-3]))
    assert keep.tolist() == [0.0, 1.0]
    assert amf.last_kept_fraction == 0.5


def test_a_batch_larger_than_the_fifo_keeps_its_newest_scores():
    amf = AdaptiveMomentumFilter(size=4, lam=1.0, warmup=0, min_history=2)
    amf(torch.arange(10.0))
    assert sorted(amf.history.tolist()) == [6.0, 7.0, 8.0, 9.0]
    amf(torch.tensor([10.0]))  # the oldest (6) is overwritten next
    assert sorted(amf.history.tolist()) == [7.0, 8.0, 9.0, 10.0]


def test_catches_noisy_pairs_in_a_mixed_stream():
    """Noisy pairs far below the clean distribution are dropped, clean pairs kept."""
    amf = AdaptiveMomentumFilter(size=512, lam=2.0, warmup=10, min_history=64)
    caught = kept_clean = n_noisy = n_clean = 0
    for step, (sims, noisy) in enumerate(_stream(60, noisy_every=10)):
        keep = amf(sims).bool()
        if step >= 10:
            caught += int((~keep & noisy).sum())
            kept_clean += int((keep & ~noisy).sum())
            n_noisy += int(noisy.sum())
            n_clean += int((~noisy).sum())
    assert caught / n_noisy > 0.95
    assert kept_clean / n_clean > 0.95


def test_clean_stream_loses_only_the_gaussian_tail():
    amf = AdaptiveMomentumFilter(size=1024, lam=2.0, warmup=0, min_history=256)
    kept = [amf(sims) for sims, _ in _stream(100, seed=3)]
    fraction = float(torch.cat(kept[10:]).mean())
    assert 0.96 < fraction < 0.995  # P(z > -2) = 0.977


def test_state_round_trips_through_state_dict_and_rejects_bad_sizes():
    amf = AdaptiveMomentumFilter(size=16, lam=2.0, warmup=0, min_history=4)
    for sims, _ in _stream(3, batch=8):
        amf(sims)
    clone = AdaptiveMomentumFilter(size=16, lam=2.0, warmup=0, min_history=4)
    clone.load_state_dict(amf.state_dict())
    assert clone.threshold() == pytest.approx(amf.threshold())
    with pytest.raises(ValueError, match="min_history"):
        AdaptiveMomentumFilter(size=16, min_history=32)


def test_statistics_are_the_fifo_mean_and_std_after_warmup():
    amf = AdaptiveMomentumFilter(size=8, lam=1.5, warmup=2, min_history=4)
    amf(torch.tensor([0.1, 0.2, 0.3]))
    assert amf.statistics() is None  # one call, three scores
    amf(torch.tensor([0.4, 0.5]))
    mean, std = amf.statistics()
    values = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    assert mean == pytest.approx(float(values.mean())) and std == pytest.approx(float(values.std()))
    assert amf.threshold() == pytest.approx(mean - 1.5 * std)
