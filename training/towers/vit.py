"""A Vision Transformer image tower whose parameter names match timm's `VisionTransformer`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.towers.checkpointing import run_block


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, W/H)
        # softmax(q k^T / sqrt(d)) v in one fused kernel (flash attention on CUDA).
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, W/H)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm naming: norm1, attn, norm2, mlp)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, N, W)


class VisionTransformer(nn.Module):
    """ViT: pixels (B, 3, S, S) -> patch states (B, N, W) and the class-token state (B, W).

    `mask` (B, N) bool swaps masked patch embeddings for a learned `mask_token` before the
    position embeddings are added (BEiT's masked image modelling). `checkpointing`
    recomputes each block in the backward pass instead of storing its activations.
    """

    checkpointing = False
    new_parameters = ("mask_token",)  # not in pretrained checkpoints

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch {patch_size}")
        if width % heads:
            raise ValueError(f"image width {width} is not divisible by {heads} heads")
        self.width = width
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_embed = PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self._init_weights()

    @property
    def head_modules(self) -> tuple[nn.Module, ...]:
        return (self.norm,)

    def _init_weights(self) -> None:
        for param in (self.cls_token, self.mask_token, self.pos_embed):
            nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        x = self.patch_embed(pixels)  # (B, N, W)
        if mask is not None:
            x = torch.where(mask[:, :, None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = run_block(block, self.checkpointing, x)
        x = self.norm(x)  # (B, 1 + N, W)
        return {"tokens": x[:, 1:], "pooled": x[:, 0]}


def resize_pos_embed(pos_embed: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a (1, 1 + h*w, W) position table to another patch grid."""
    cls, grid = pos_embed[:, :1], pos_embed[0, 1:]
    side = int(round(grid.shape[0] ** 0.5))
    if side * side != grid.shape[0]:
        raise ValueError(f"position table of {grid.shape[0]} patches is not a square grid")
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, W, h, w)
    grid = F.interpolate(grid, size=grid_size, mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])], dim=1)
