"""The video model: frames through the image tower, then temporal pooling (CLIP4Clip's
meanP / seqTransf).

A video is N frames sampled uniformly (`index_builder.video`), each encoded by the image
tower and projection into the shared space and L2-normalised; `VideoTwoTower.encode_image`
pools them over time into one unit vector per video, so every objective that trains image-text
pairs (COTS instance level with queues, KL, AMF; the CLIP baseline) trains video-text pairs
unchanged. Pooling (`ModelConfig.video_pooling`):

- meanP: the masked mean of the unit frame embeddings, re-normalised (CLIP4Clip's default);
- seqTransf: frame embeddings plus learned frame-position embeddings through a small
  pre-norm transformer (masked attention), plus the input (CLIP4Clip's residual), normalised,
  then the masked mean, re-normalised. Its output projections start at zero, so it starts
  as meanP plus the position embeddings and learns order from there. Unlike CLIP4Clip (which
  pools the projected, unnormalised CLIP features) it runs on the unit frame embeddings, the
  exported frame encoder's output, so the bundle needs no second image graph.

Batches of videos are `pixels` (B, N, 3, S, S) in which an all-zero frame is padding (no frame
is exactly zero after normalisation: no 8-bit value equals a channel mean), or, over a feature
cache, rows whose padded frames hold zero features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.model_config import ModelConfig
from training.two_tower import TwoTower


def masked_mean(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """frames (B, N, D), mask (B, N) -> the unit mean of the unmasked frames (B, D)."""
    weights = mask.to(frames.dtype)[:, :, None]  # (B, N, 1)
    total = (frames * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)  # (B, D)
    return F.normalize(total, dim=-1)


class MeanPooling(nn.Module):
    """meanP: the masked mean of unit frame embeddings, re-normalised."""

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(frames, mask)


class TemporalBlock(nn.Module):
    """Pre-norm transformer block whose attention ignores padded frames."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"video width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        for out in (self.proj, self.fc2):  # the block starts as the identity
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, W/H)
        scores = (q @ k.transpose(-1, -2)) * (width // self.heads) ** -0.5  # (B, H, N, N)
        padding = (1.0 - mask.to(scores.dtype))[:, None, None, :] * -1e4  # keys only
        attended = F.softmax(scores + padding, dim=-1) @ v  # (B, H, N, W/H)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SeqTransfPooling(nn.Module):
    """seqTransf: position embeddings + temporal transformer + residual, then masked mean."""

    def __init__(self, width: int, frames: int, layers: int, heads: int) -> None:
        super().__init__()
        self.positions = nn.Parameter(torch.zeros(frames, width))
        nn.init.normal_(self.positions, std=0.02)
        self.blocks = nn.ModuleList(TemporalBlock(width, heads) for _ in range(layers))

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = frames + self.positions[: frames.shape[1]]  # (B, N, D)
        for block in self.blocks:
            x = block(x, mask)
        return masked_mean(F.normalize(x + frames, dim=-1), mask)  # (B, D)


def build_pooling(config: ModelConfig) -> nn.Module:
    if config.video_pooling == "seqTransf":
        return SeqTransfPooling(
            config.embed_dim, config.video_frames, config.video_layers, config.video_heads
        )
    return MeanPooling()


class VideoTwoTower(TwoTower):
    """A TwoTower whose image side takes videos: `encode_image` pools the frames over time
    (an image is a one-frame video). `video_pool` is the temporal pooling module."""

    def __init__(self, config: ModelConfig, image_tower, text_tower, tokenizer_json) -> None:
        super().__init__(config, image_tower, text_tower, tokenizer_json)
        self.video_spec = config.video_spec()
        self.video_pool = build_pooling(config)

    def frame_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Videos (B, N, 3, S, S), cached frame rows, or images (B, 3, S, S) -> pooled tower
        features per frame (B, N, W) and the frame mask (B, N) bool."""
        if pixels.dim() == 5:
            batch, count = pixels.shape[:2]
            mask = pixels.flatten(2).ne(0).any(dim=-1)  # (B, N): all-zero frames are padding
            pooled = self.image_tower(pixels.flatten(0, 1))["pooled"]  # (B * N, W)
            return pooled.view(batch, count, -1), mask
        out = self.image_tower(pixels)
        if "mask" in out:  # cached frames
            return out["pooled"], out["mask"]
        pooled = out["pooled"][:, None]  # (B, 1, W): an image is a one-frame video
        return pooled, torch.ones(pooled.shape[:2], dtype=torch.bool, device=pooled.device)

    def encode_frames(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Tower features per frame (B, N, W) -> unit video embeddings (B, D)."""
        frames = F.normalize(self.image_proj(features), dim=-1)  # (B, N, D)
        return self.video_pool(frames, mask)

    def image_features(self, pixels: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """Videos -> per-frame tower features `frames` (B, N, W) and their `mask` (B, N): what
        the objectives' step context shares between units before `embed_image`."""
        frames, frame_mask = self.frame_features(pixels)
        return {"frames": frames, "mask": frame_mask}

    def embed_image(self, features: dict, normalize: bool = True) -> torch.Tensor:
        """`image_features` output -> (B, D); always unit vectors (pooling normalises)."""
        return self.encode_frames(features["frames"], features["mask"])
