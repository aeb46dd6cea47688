"""The `kl` unit: COTS task-level interaction, symmetric KL between the image-to-text and
text-to-image distributions over {positive, K queued pairs}."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.objectives.base import Objective, StepContext, weighted_mean


def symmetric_kl(
    logits_i2t: torch.Tensor, logits_t2i: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """( KL(p||q) + KL(q||p) ) / 2 per pair, averaged with optional per-sample `weights`.

    p = softmax(logits_i2t), q = softmax(logits_t2i), both (B, 1 + K) with the positive at
    column 0 and column k of both rows naming the same queued pair: the queues share one
    write pointer (METHOD.md), so p and q are distributions over the same set of pairs.
    """
    if logits_i2t.shape != logits_t2i.shape:
        raise ValueError(
            f"logits_i2t {tuple(logits_i2t.shape)} and logits_t2i "
            f"{tuple(logits_t2i.shape)} must have the same shape"
        )
    log_p = F.log_softmax(logits_i2t.float(), dim=1)  # (B, 1+K)
    log_q = F.log_softmax(logits_t2i.float(), dim=1)  # (B, 1+K)
    p, q = log_p.exp(), log_q.exp()
    per_pair = 0.5 * ((p * (log_p - log_q)).sum(1) + (q * (log_q - log_p)).sum(1))  # (B,)
    return weighted_mean(per_pair, weights)


class KlObjective(Objective):
    """The KL term as an objective unit; it reads the queued logits that the instance unit
    leaves in the step context, so it runs after it."""

    name = "kl"
    needs_memory = True

    @classmethod
    def from_config(cls, cfg, model: nn.Module) -> KlObjective:
        if not cfg.objectives.instance.enabled:
            raise ValueError(
                "objectives.kl needs objectives.instance (it aligns the queued logits)"
            )
        return cls()

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        logits = ctx.queued_logits
        assert logits is not None, "the instance unit runs before kl (config order)"
        return {"kl": symmetric_kl(logits.i2t, logits.t2i, ctx.weights)}
