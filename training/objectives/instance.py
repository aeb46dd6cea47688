"""The `instance` unit: COTS instance level, momentum contrast against the paired queues."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from training.objectives.base import Objective, QueuedLogits, StepContext, weighted_mean


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


class InstanceObjective(Objective):
    """Momentum contrast against the paired queues. Leaves its logits in
    `ctx.queued_logits` for the task-level alignment (`kl`)."""

    name = "instance"
    needs_memory = True

    def __init__(self) -> None:
        super().__init__()
        self.loss = MomentumContrastLoss()

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        queue = ctx.momentum().queue
        out = self.loss(
            ctx.image(),
            ctx.text(),
            ctx.image_key(),
            ctx.text_key(),
            queue.image_keys().clone(),  # clone: the queue is written before backward ends
            queue.text_keys().clone(),
            ctx.tau(),
            ctx.weights,
        )
        ctx.queued_logits = QueuedLogits(out.logits_i2t, out.logits_t2i)
        return {"instance": out.loss}
