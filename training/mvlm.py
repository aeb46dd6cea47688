"""COTS token level (MVLM) prediction heads: masked words and masked visual tokens, each
predicted from its own stream's token state joined with the other stream's global feature.

The heads live beside the model, never inside it: the towers that `cots export` writes carry
no trace of them, so query time stays two independent towers (METHOD.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.masking import IGNORE_INDEX


class MaskedTokenHead(nn.Module):
    """logits = MLP([h_token ; g_other]) over a vocabulary, evaluated at masked positions only.

    MLM: h = text tower state of a masked word, g = paired image's global feature,
    vocabulary = word pieces. MVM: h = image tower state of a masked patch (or feature-map
    cell), g = paired caption's global feature, vocabulary = the visual tokenizer's codes.
    The MLP is BERT's prediction-head transform (dense, GELU, LayerNorm) then the decoder.
    """

    def __init__(
        self, token_width: int, global_width: int, vocab_size: int, hidden: int | None = None
    ) -> None:
        super().__init__()
        hidden = hidden or token_width
        self.mlp = nn.Sequential(
            nn.Linear(token_width + global_width, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden),
            nn.Linear(hidden, vocab_size),
        )

    def forward(
        self,
        tokens: torch.Tensor,  # (B, N, W) states of the masked input
        global_feature: torch.Tensor,  # (B, G) the paired sample's global feature
        labels: torch.Tensor,  # (B, N) target ids, IGNORE_INDEX where nothing was masked
        weights: torch.Tensor | None = None,  # (B,) per-sample weights (noisy-pair filter)
    ) -> torch.Tensor:
        """Cross-entropy averaged over masked positions (weighted by their sample's weight)."""
        if tokens.shape[:2] != labels.shape:
            raise ValueError(
                f"token states {tuple(tokens.shape)} do not match labels {tuple(labels.shape)}"
            )
        rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # (M,), (M,)
        if rows.numel() == 0:  # nothing masked in this batch: a zero that keeps the graph
            return tokens.sum() * 0.0 + global_feature.sum() * 0.0
        joined = torch.cat([tokens[rows, cols], global_feature[rows]], dim=-1)  # (M, W + G)
        logits = self.mlp(joined).float()  # (M, V)
        per_token = F.cross_entropy(logits, labels[rows, cols], reduction="none")  # (M,)
        if weights is None:
            return per_token.mean()
        token_weights = weights.to(per_token.dtype)[rows]  # (M,)
        return (per_token * token_weights).sum() / token_weights.sum().clamp_min(1e-6)

    @torch.no_grad()
    def accuracy(
        self, tokens: torch.Tensor, global_feature: torch.Tensor, labels: torch.Tensor
    ) -> float:
        """Top-1 accuracy at the masked positions (a training diagnostic)."""
        rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return float("nan")
        joined = torch.cat([tokens[rows, cols], global_feature[rows]], dim=-1)
        return float((self.mlp(joined).argmax(-1) == labels[rows, cols]).float().mean())
