"""Masking for MVLM: BERT word-piece masking (15%, 80/10/10) and BEiT block-wise patch masking."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

IGNORE_INDEX = -100  # label of positions that carry no MLM/MVM target (torch's CE default)


def mask_text(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_id: int,
    special_ids: Iterable[int],
    vocab_size: int,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019, section 3.1): pick `prob` of the real word pieces;
    of those 80% become [MASK], 10% a random word piece, 10% stay unchanged.

    Special tokens ([CLS], [SEP], [PAD]) and padding are never picked.
    Returns (masked_ids (B, L), labels (B, L)): labels hold the original id at picked
    positions and IGNORE_INDEX elsewhere.
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"text mask probability must be in (0, 1), got {prob}")
    device = input_ids.device
    specials = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype, device=device)
    maskable = attention_mask.bool() & ~torch.isin(input_ids, specials)  # (B, L)
    draw = torch.rand(input_ids.shape, generator=generator, device=device)  # (B, L)
    picked = maskable & (draw < prob)
    # Re-use the same uniform draw, rescaled to [0, 1) within the picked set, for 80/10/10.
    split = draw / prob
    to_mask = picked & (split < 0.8)
    to_random = picked & (split >= 0.8) & (split < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    masked = input_ids.clone()
    masked[to_mask] = mask_id
    masked[to_random] = random_ids[to_random].to(input_ids.dtype)
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


def block_mask(
    height: int,
    width: int,
    ratio: float = 0.4,
    *,
    min_block: int = 4,
    min_aspect: float = 0.3,
    rng: np.random.Generator,
) -> np.ndarray:
    """One BEiT block-wise mask (Bao et al. 2022, Algorithm 1; `MaskingGenerator` of the
    BEiT code): add random rectangles of at least `min_block` cells and aspect ratio in
    [min_aspect, 1/min_aspect] until about `ratio` of the height x width grid is masked.

    Never masks more than round(ratio * cells) cells; returns a bool (height, width) array.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"patch mask ratio must be in (0, 1), got {ratio}")
    target = max(1, round(ratio * height * width))
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < target:
        added = _add_block(mask, target - count, min_block, log_aspect, rng)
        if added == 0:
            break
        count += added
    return mask


def _add_block(
    mask: np.ndarray,
    budget: int,
    min_block: int,
    log_aspect: tuple[float, float],
    rng: np.random.Generator,
) -> int:
    height, width = mask.shape
    for _ in range(10):
        area = rng.uniform(min(min_block, budget), budget)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = max(1, min(height, round(math.sqrt(area * aspect))))
        w = max(1, min(width, round(math.sqrt(area / aspect))))
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        block = mask[top : top + h, left : left + w]
        new = int(h * w - block.sum())
        if 0 < new <= budget:
            block[...] = True
            return new
    return 0


def mask_patches(
    batch: int,
    grid: tuple[int, int],
    ratio: float = 0.4,
    *,
    min_block: int = 4,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Block-wise masks for a batch: bool (B, h * w), row-major like the tower's patch order."""
    height, width = grid
    masks = [block_mask(height, width, ratio, min_block=min_block, rng=rng) for _ in range(batch)]
    return torch.from_numpy(np.stack(masks).reshape(batch, height * width))
