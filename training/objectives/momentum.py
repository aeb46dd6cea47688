"""The momentum (EMA) copy of both towers and their projections (MoCo / ALBEF)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class MomentumEncoder(nn.Module):
    """theta' <- m * theta' + (1 - m) * theta for every trainable parameter; buffers copied.

    The copy runs in eval mode (no dropout; batch norm uses the running statistics copied
    from the online model) and never receives gradients. Frozen parameters are skipped:
    they are equal in both copies from the start and never change.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.995) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    def train(self, mode: bool = True) -> MomentumEncoder:
        return self  # always eval: see the class docstring

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        m = self.momentum
        pairs = zip(online.named_parameters(), self.model.named_parameters(), strict=True)
        for (name, param), (name_m, param_m) in pairs:
            assert name == name_m, (name, name_m)
            if param.requires_grad:
                param_m.mul_(m).add_(param.detach(), alpha=1.0 - m)
        for buf, buf_m in zip(online.buffers(), self.model.buffers(), strict=True):
            buf_m.copy_(buf)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)  # (B, D) normalised v'

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)  # (B, D) normalised t'
