"""The task-level symmetric KL against a naive per-element loop."""

from __future__ import annotations

import math

import pytest
import torch

from training.objectives.kl import symmetric_kl


def _naive(logits_a, logits_b, weights=None):
    total, norm = 0.0, 0.0
    for row in range(logits_a.shape[0]):
        za = sum(math.exp(x) for x in logits_a[row].tolist())
        zb = sum(math.exp(x) for x in logits_b[row].tolist())
        p = [math.exp(x) / za for x in logits_a[row].tolist()]
        q = [math.exp(x) / zb for x in logits_b[row].tolist()]
        kl_pq = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        kl_qp = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))
        w = 1.0 if weights is None else float(weights[row])
        total += w * (kl_pq + kl_qp) / 2
        norm += w
    return total / norm


def test_symmetric_kl_matches_naive_loop():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 9, generator=gen) * 3, torch.randn(5, 9, generator=gen) * 3
    assert float(symmetric_kl(a, b)) == pytest.approx(_naive(a, b), rel=1e-5)
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    assert float(symmetric_kl(a, b, weights)) == pytest.approx(_naive(a, b, weights), rel=1e-5)


def test_symmetric_kl_is_symmetric_zero_on_equal_and_differentiable():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 6, generator=gen, requires_grad=True)
    b = torch.randn(4, 6, generator=gen, requires_grad=True)
    assert float(symmetric_kl(a, b).detach()) == pytest.approx(float(symmetric_kl(b, a).detach()))
    assert float(symmetric_kl(a, a + 5.0).detach()) == pytest.approx(0.0, abs=1e-6)  # softmax shift
    symmetric_kl(a, b).backward()
    assert a.grad is not None and b.grad is not None and a.grad.abs().sum() > 0


def test_symmetric_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must have the same shape"):
        symmetric_kl(torch.zeros(2, 3), torch.zeros(2, 4))
