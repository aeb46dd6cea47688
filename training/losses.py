"""Contrastive losses: in-batch InfoNCE (CLIP) and momentum contrast over queues (COTS)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import gather_with_local_grad, world


class Temperature(nn.Module):
    """A learnable softmax temperature tau, kept in [min_value, max_value] (ALBEF's `temp`)."""

    def __init__(
        self,
        init: float = 0.07,
        min_value: float = 0.001,
        max_value: float = 0.5,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if not min_value <= init <= max_value:
            raise ValueError(f"temperature {init} outside [{min_value}, {max_value}]")
        self.min_value, self.max_value = min_value, max_value
        self.tau = nn.Parameter(torch.tensor(float(init)), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        return self.tau.clamp(self.min_value, self.max_value)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Called after each optimiser step so the stored value never leaves the range."""
        self.tau.clamp_(self.min_value, self.max_value)


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B,) losses; with per-sample weights (the noisy-pair filter) a weighted mean."""
    if weights is None:
        return per_sample.mean()
    weights = weights.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1e-6)


class ClipLoss(nn.Module):
    """Symmetric in-batch InfoNCE (CLIP; open_clip `ClipLoss`) with the cross-rank gather.

    Each rank scores its own images against every rank's texts and vice versa; the
    positive of local row i is global column rank * B + i.
    """

    def forward(
        self,
        image: torch.Tensor,  # (B, D) normalised
        text: torch.Tensor,  # (B, D) normalised
        tau: torch.Tensor,
        weights: torch.Tensor | None = None,  # (B,)
    ) -> torch.Tensor:
        rank, _ = world()
        all_image = gather_with_local_grad(image)  # (world * B, D)
        all_text = gather_with_local_grad(text)  # (world * B, D)
        logits_i2t = image @ all_text.T / tau  # (B, world * B)
        logits_t2i = text @ all_image.T / tau  # (B, world * B)
        labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        i2t = F.cross_entropy(logits_i2t.float(), labels, reduction="none")  # (B,)
        t2i = F.cross_entropy(logits_t2i.float(), labels, reduction="none")  # (B,)
        return (weighted_mean(i2t, weights) + weighted_mean(t2i, weights)) / 2


class ContrastOutput(NamedTuple):
    loss: torch.Tensor
    logits_i2t: torch.Tensor  # (B, 1 + K): positive at column 0, then the queued texts
    logits_t2i: torch.Tensor  # (B, 1 + K): positive at column 0, then the queued images


class MomentumContrastLoss(nn.Module):
    """COTS instance level (METHOD.md; MoCo with paired queues):

        logits_i2t = [v.t'_pos, v.Qt] / tau,  logits_t2i = [t.v'_pos, t.Qv] / tau
        L = (CE(logits_i2t, 0) + CE(logits_t2i, 0)) / 2

    The logits are returned too: the task-level KL loss compares their two softmaxes, which
    only makes sense because row k of Qv and Qt come from the same pair.
    """

    def forward(
        self,
        image: torch.Tensor,  # (B, D) online v
        text: torch.Tensor,  # (B, D) online t
        image_key: torch.Tensor,  # (B, D) momentum v'
        text_key: torch.Tensor,  # (B, D) momentum t'
        image_queue: torch.Tensor,  # (K, D) Qv
        text_queue: torch.Tensor,  # (K, D) Qt
        tau: torch.Tensor,
        weights: torch.Tensor | None = None,  # (B,)
    ) -> ContrastOutput:
        pos_i2t = (image * text_key).sum(-1, keepdim=True)  # (B, 1)
        pos_t2i = (text * image_key).sum(-1, keepdim=True)  # (B, 1)
        logits_i2t = torch.cat([pos_i2t, image @ text_queue.T], dim=1).float() / tau  # (B, 1+K)
        logits_t2i = torch.cat([pos_t2i, text @ image_queue.T], dim=1).float() / tau  # (B, 1+K)
        target = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
        i2t = F.cross_entropy(logits_i2t, target, reduction="none")  # (B,)
        t2i = F.cross_entropy(logits_t2i, target, reduction="none")  # (B,)
        loss = (weighted_mean(i2t, weights) + weighted_mean(t2i, weights)) / 2
        return ContrastOutput(loss, logits_i2t, logits_t2i)
