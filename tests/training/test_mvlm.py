"""MVLM prediction heads against a naive per-position loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.masking import IGNORE_INDEX
from training.mvlm import MaskedTokenHead


def _naive(head, tokens, global_feature, labels, weights=None):
    total, norm = 0.0, 0.0
    for b in range(labels.shape[0]):
        for n in range(labels.shape[1]):
            if labels[b, n] == IGNORE_INDEX:
                continue
            joined = torch.cat([tokens[b, n], global_feature[b]])[None]
            loss = F.cross_entropy(head.mlp(joined), labels[b, n][None])
            w = 1.0 if weights is None else float(weights[b])
            total, norm = total + w * loss, norm + w
    return total / norm


@pytest.fixture
def case():
    torch.manual_seed(0)
    head = MaskedTokenHead(token_width=6, global_width=4, vocab_size=11, hidden=8)
    tokens, global_feature = torch.randn(3, 5, 6), torch.randn(3, 4)
    labels = torch.full((3, 5), IGNORE_INDEX)
    labels[0, 1], labels[0, 4], labels[1, 0], labels[2, 2], labels[2, 3] = 3, 7, 10, 0, 5
    return head, tokens, global_feature, labels


def test_head_loss_matches_naive_loop(case):
    head, tokens, global_feature, labels = case
    expected = _naive(head, tokens, global_feature, labels)
    assert head(tokens, global_feature, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_per_sample_weights_drop_a_sample(case):
    head, tokens, global_feature, labels = case
    weights = torch.tensor([1.0, 0.0, 1.0])
    got = head(tokens, global_feature, labels, weights)
    expected = _naive(head, tokens, global_feature, labels, weights)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    tokens2 = tokens.clone()
    tokens2[1] += 100.0  # the dropped sample no longer matters
    assert head(tokens2, global_feature, labels, weights).item() == pytest.approx(got.item())


def test_the_other_streams_global_feature_reaches_the_prediction(case):
    head, tokens, global_feature, labels = case
    tokens.requires_grad_(True)
    global_feature.requires_grad_(True)
    head(tokens, global_feature, labels).backward()
    assert global_feature.grad[0].abs().sum() > 0 and tokens.grad[0, 1].abs().sum() > 0
    assert tokens.grad[0, 0].abs().sum() == 0  # unmasked positions carry no loss


def test_nothing_masked_gives_a_differentiable_zero(case):
    head, tokens, global_feature, _ = case
    tokens.requires_grad_(True)
    loss = head(tokens, global_feature, torch.full((3, 5), IGNORE_INDEX))
    loss.backward()
    assert float(loss) == 0.0 and tokens.grad is not None


def test_shape_mismatch_is_an_error(case):
    head, tokens, global_feature, labels = case
    with pytest.raises(ValueError, match="do not match labels"):
        head(tokens, global_feature, labels[:, :4])
