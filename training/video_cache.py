"""Frozen towers over videos: per-frame image tower features and caption features computed
once (`encode_video_split`, kept in memory), and what trains and scores on their rows: a
`VideoTwoTower` sharing the model's projections and pooling (`cached_video_model`), the
training set (`CachedVideoPairs`) and the evaluator (`CachedVideoEvaluator`). The image-side
counterpart is training/feature_cache.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from index_builder.manifest import Record, load_records
from index_builder.preprocess import TextTokenizer
from index_builder.progress import progress
from index_builder.video import VideoError, VideoLimits
from training.feature_cache import CachedTower, CaptionDraw
from training.two_tower import TwoTower
from training.video_datasets import load_clip
from training.video_evaluate import video_metrics
from training.video_model import VideoTwoTower

log = logging.getLogger(__name__)


class CachedFrames(nn.Module):
    """Stands in for a frozen image tower over videos: row `index` of cached frame features
    (V, N, W) and their masks (V, N)."""

    def __init__(self, features: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.features, self.mask = features, mask  # plain attributes, as CachedTower
        self.width = features.shape[-1]

    def forward(self, index: torch.Tensor, *_: object) -> dict[str, torch.Tensor]:
        rows = index.reshape(index.shape[0], -1)[:, 0].cpu()  # (B,)
        return {
            "pooled": self.features[rows].to(index.device),  # (B, N, W)
            "mask": self.mask[rows].to(index.device),  # (B, N)
        }


def cached_video_model(
    model: VideoTwoTower, frames: torch.Tensor, mask: torch.Tensor, text: torch.Tensor
) -> VideoTwoTower:
    """A VideoTwoTower over cached features sharing `model`'s projections and pooling."""
    cached = VideoTwoTower(
        model.config, CachedFrames(frames, mask), CachedTower(text), model.tokenizer_json
    )
    cached.image_proj, cached.text_proj = model.image_proj, model.text_proj
    cached.video_pool = model.video_pool
    object.__setattr__(cached, "source", model)  # not a submodule: never saved twice
    return cached


@torch.no_grad()
def encode_video_split(
    model: VideoTwoTower,
    dataset: str | Path,
    split: str,
    batch: int = 64,
    limits: VideoLimits = VideoLimits(),
) -> dict[str, Any]:
    """Frozen tower features of a split's videos and captions: `frames` (V, N, W) (zeros for
    padding), `mask` (V, N), `text` (M, Wt), `owner` (M,), `rows` (caption rows per video).
    A video that cannot be decoded is skipped with its captions and counted in `skipped`."""
    model.eval()
    spec, count = model.image_spec, model.video_spec.frames
    kept, features, masks, skipped = [], [], [], 0
    for record in progress(load_records(dataset, split), desc=f"cache {split} videos", leave=False):
        try:
            pixels, mask = load_clip(dataset, record, spec, count, limits)
        except (VideoError, OSError) as exc:
            log.warning("skipping video %r: %s", record.id, exc)
            skipped += 1
            continue
        pooled = torch.zeros(count, model.image_tower.width)
        pooled[: int(mask.sum())] = _frames_in_batches(model, pixels[mask], batch)
        kept.append(record)
        features.append(pooled)
        masks.append(torch.from_numpy(mask))
    if not kept:
        raise ValueError(f"no decodable videos in split {split!r} of {dataset}")
    text, owner, rows = _encode_captions(model, kept, batch)
    return {
        "frames": torch.stack(features),
        "mask": torch.stack(masks),
        "text": text,
        "owner": owner,
        "rows": rows,
        "skipped": skipped,
    }


def _frames_in_batches(model: TwoTower, pixels: np.ndarray, batch: int) -> torch.Tensor:
    parts = [
        model.image_tower(torch.from_numpy(pixels[i : i + batch]))["pooled"]
        for i in range(0, len(pixels), batch)
    ]
    return torch.cat(parts)  # (n, W)


def _encode_captions(model: TwoTower, records: list[Record], batch: int):
    captions = [c for r in records for c in r.captions]
    owner = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
    tokenizer = TextTokenizer(model.tokenizer_json, model.text_spec.context_length)
    texts = []
    for start in range(0, len(captions), batch * 2):
        ids, mask = tokenizer(captions[start : start + batch * 2])
        texts.append(model.text_features(torch.from_numpy(ids), torch.from_numpy(mask))["pooled"])
    rows, offset = [], 0
    for r in records:
        rows.append(list(range(offset, offset + len(r.captions))))
        offset += len(r.captions)
    return torch.cat(texts), owner, rows


class CachedVideoPairs(CaptionDraw):
    """Cached video row i and one of its caption rows (`CaptionDraw`)."""

    @staticmethod
    def collate(items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        video, caption = torch.tensor(items).T  # (B,), (B,)
        return {
            "pixels": video,  # row of the frame cache
            "input_ids": caption[:, None],  # (B, 1) row of the caption cache
            "attention_mask": torch.ones(len(items), 1, dtype=torch.long),
            "index": video,
        }


class CachedVideoEvaluator:
    """Scores a split from cached frozen features: only projections and pooling run."""

    def __init__(self, cache: dict[str, Any]) -> None:
        self.cache = cache

    @torch.no_grad()
    def evaluate(self, model: VideoTwoTower, device: torch.device | str = "cpu") -> dict:
        c = self.cache
        video = model.encode_frames(c["frames"].to(device), c["mask"].to(device)).cpu()
        text = F.normalize(model.text_proj(c["text"].to(device)), dim=-1).cpu()
        return video_metrics(video.float(), text.float(), c["owner"])
