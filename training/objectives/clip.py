"""The `clip` unit: symmetric in-batch InfoNCE (CLIP), the baseline of every comparison."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import gather_with_local_grad, world
from training.objectives.base import Objective, StepContext, weighted_mean


class ClipLoss(nn.Module):
    """Symmetric in-batch InfoNCE (CLIP; open_clip `ClipLoss`) with the cross-rank gather.

    Each rank scores its own rows of `a` against every rank's rows of `b` and vice versa; the
    positive of local row i is global column rank * B + i. Any two aligned (B, D) batches
    work: image vs text here, and COOKIE's knowledge pairs (training/objectives/cookie.py).
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


class ClipObjective(Objective):
    """In-batch symmetric InfoNCE between the online image and text embeddings."""

    name = "clip"

    def __init__(self) -> None:
        super().__init__()
        self.loss = ClipLoss()

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"clip": self.loss(ctx.image(), ctx.text(), ctx.tau(), ctx.weights)}
