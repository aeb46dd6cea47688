"""COOKIE's weight-sharing transformer: one stack of pre-norm blocks that each stream runs
alone over its own token sequence (never joint attention: the model stays two-stream)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOLING = ("mean", "cls")


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, W/H)
        scores = (q @ k.transpose(-1, -2)) * (width // self.heads) ** -0.5  # (B, H, L, L)
        if keep is not None:  # padded keys get the dtype's lowest value (safe in fp16 too)
            scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
        out = F.softmax(scores, dim=-1) @ v  # (B, H, L, W/H)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class SharedBlock(nn.Module):
    """Pre-norm transformer block (ViT's): attention then MLP, each with a residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class SharedTransformer(nn.Module):
    """(B, N, C) token sequence of either stream (after its own linear map to width C) and an
    optional (B, N) mask of real tokens -> pooled (B, C).

    `pooling="mean"`: average of the final states over the real tokens; `"cls"`: a learned
    query token is prepended and its final state taken (shared by both streams, like every
    other weight here).
    """

    def __init__(
        self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, pooling: str = "mean"
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"shared width {width} is not divisible by {heads} heads")
        if pooling not in POOLING:
            raise ValueError(f"shared pooling must be one of {POOLING}, got {pooling!r}")
        self.pooling = pooling
        self.blocks = nn.ModuleList(SharedBlock(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        if pooling == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = None if mask is None else mask.bool()  # (B, N)
        x = tokens
        if self.pooling == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            if keep is not None:
                keep = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)  # (B, 1 + N)
        for block in self.blocks:
            x = block(x, keep)
        x = self.norm(x)  # (B, N', C)
        if self.pooling == "cls":
            return x[:, 0]
        if keep is None:
            return x.mean(1)
        weights = keep[:, :, None].to(x.dtype)  # (B, N, 1)
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, C)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
