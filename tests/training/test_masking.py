"""BERT text masking and BEiT block-wise patch masking: statistics and invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.objectives.masking import IGNORE_INDEX, block_mask, mask_patches, mask_text

CLS, SEP, PAD, MASK, VOCAB = 101, 102, 0, 103, 30522


def _batch(rows: int = 4000, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, length + 1, (rows,), generator=gen)
    ids = torch.randint(1000, VOCAB, (rows, length), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(rows), lengths - 1] = SEP
    ids[mask == 0] = PAD
    return ids, mask


def _mask(ids, attn, prob=0.15, seed=1):
    return mask_text(
        ids,
        attn,
        mask_id=MASK,
        special_ids=(CLS, SEP, PAD, MASK),
        vocab_size=VOCAB,
        prob=prob,
        generator=torch.Generator().manual_seed(seed),
    )


def test_text_masking_follows_bert_80_10_10():
    ids, attn = _batch()
    masked, labels = _mask(ids, attn)
    picked = labels != IGNORE_INDEX
    maskable = (attn == 1) & (ids != CLS) & (ids != SEP)
    assert abs(picked.sum() / maskable.sum() - 0.15) < 0.01
    assert torch.equal(labels[picked], ids[picked])
    became_mask = (masked == MASK) & picked
    unchanged = (masked == ids) & picked
    random = picked & ~became_mask & ~unchanged
    n = picked.sum()
    assert abs(became_mask.sum() / n - 0.8) < 0.02
    assert abs(unchanged.sum() / n - 0.1) < 0.015  # random draws equal to the id are ~3e-5
    assert abs(random.sum() / n - 0.1) < 0.015
    assert torch.equal(masked[~picked], ids[~picked])  # nothing else is touched


def test_text_masking_never_touches_special_tokens_or_padding():
    ids, attn = _batch(500)
    masked, labels = _mask(ids, attn, prob=0.9)
    special = (ids == CLS) | (ids == SEP) | (attn == 0)
    assert (labels[special] == IGNORE_INDEX).all()
    assert torch.equal(masked[special], ids[special])


def test_text_masking_is_reproducible_and_rejects_bad_probability():
    ids, attn = _batch(50)
    assert torch.equal(_mask(ids, attn, seed=3)[0], _mask(ids, attn, seed=3)[0])
    with pytest.raises(ValueError, match="text mask probability"):
        _mask(ids, attn, prob=0.0)


@pytest.mark.parametrize("grid", [(7, 7), (14, 14), (8, 8)])
def test_block_mask_covers_about_forty_percent_never_more(grid):
    rng = np.random.default_rng(0)
    cells = grid[0] * grid[1]
    target = round(0.4 * cells)
    counts = [block_mask(*grid, 0.4, rng=rng).sum() for _ in range(400)]
    assert max(counts) <= target
    assert np.mean(counts) > 0.85 * target


def test_block_mask_is_blockwise_not_scattered():
    """Masked cells have many more masked 4-neighbours than an i.i.d. mask of the same rate."""
    rng = np.random.default_rng(1)

    def neighbour_rate(mask: np.ndarray) -> float:
        padded = np.pad(mask, 1).astype(int)
        around = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
        return float(around[mask].mean())

    blocks = np.mean([neighbour_rate(block_mask(14, 14, 0.4, rng=rng)) for _ in range(100)])
    scattered = np.mean([neighbour_rate(rng.random((14, 14)) < 0.4) for _ in range(100)])
    assert blocks > scattered + 1.0


def test_mask_patches_is_row_major_over_the_grid():
    masks = mask_patches(3, (2, 5), 0.4, min_block=1, rng=np.random.default_rng(2))
    assert masks.shape == (3, 10) and masks.dtype == torch.bool
    assert (masks.sum(1) >= 1).all() and (masks.sum(1) <= 4).all()
    with pytest.raises(ValueError, match="patch mask ratio"):
        block_mask(4, 4, 1.0, rng=np.random.default_rng(0))
