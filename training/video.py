"""Video as frames through the image tower, then temporal pooling (CLIP4Clip's meanP / seqTransf).

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

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from index_builder.manifest import Record, image_path, load_records
from index_builder.preprocess import ImageSpec, TextTokenizer
from index_builder.progress import progress
from index_builder.video import VideoError, VideoLimits, decode_video, is_video_path, video_pixels
from training.evaluate import retrieval_metrics
from training.model import ModelConfig, TwoTower

log = logging.getLogger(__name__)


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


class CachedVideoPairs(Dataset):
    """Item i: cached video row i and one of its caption rows, drawn afresh each epoch
    (seeded by (seed, epoch, i) as in PairDataset)."""

    def __init__(self, caption_rows: list[list[int]], seed: int = 0) -> None:
        self.rows, self.seed, self.epoch = caption_rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, int]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        rows = self.rows[index]
        return index, rows[int(rng.integers(len(rows)))]

    @staticmethod
    def collate(items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        video, caption = torch.tensor(items).T  # (B,), (B,)
        return {
            "pixels": video,  # row of the frame cache
            "input_ids": caption[:, None],  # (B, 1) row of the caption cache
            "attention_mask": torch.ones(len(items), 1, dtype=torch.long),
            "index": video,
        }


# -- data ------------------------------------------------------------------------------------


def check_video_data(records: list[Record], video: bool, dataset: str | Path) -> None:
    """A video recipe needs a video gallery and an image recipe an image one."""
    if not records or is_video_path(records[0].image) == video:
        return
    if video:
        raise ValueError(
            f"this recipe trains on videos (model.options.video_frames > 0) but {dataset} "
            "holds images; use an image recipe or a video gallery (cots data synthetic-video)"
        )
    raise ValueError(
        f"{dataset} holds videos; train it with a video recipe (cots-video, cots-video-cpu) "
        "or set model.options.video_frames"
    )


def load_clip(
    dataset: str | Path,
    record: Record,
    spec: ImageSpec,
    frames: int,
    limits: VideoLimits = VideoLimits(),
) -> tuple[np.ndarray, np.ndarray]:
    """A record's video -> pixels (N, 3, S, S) (zeros past its last frame) and mask (N,)."""
    clip = decode_video(image_path(dataset, record), frames, limits)
    return video_pixels(clip.frames, spec, frames)


class VideoPairDataset(Dataset):
    """Item i: video i of the split (N frames, zero-padded) and one of its captions, drawn
    afresh each epoch (seeded by (seed, epoch, i) as `PairDataset`). No augmentation."""

    def __init__(
        self,
        dataset: str | Path,
        split: str,
        spec: ImageSpec,
        frames: int,
        seed: int = 0,
        limits: VideoLimits = VideoLimits(),
    ) -> None:
        self.dataset, self.spec, self.frames, self.limits = dataset, spec, frames, limits
        self.records = load_records(dataset, split)
        if not self.records:
            raise ValueError(f"split {split!r} of {dataset} has no records")
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, int]:
        record = self.records[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        caption = record.captions[int(rng.integers(len(record.captions)))]
        try:
            pixels, _ = load_clip(self.dataset, record, self.spec, self.frames, self.limits)
        except VideoError as exc:
            raise ValueError(f"training video {record.id!r} cannot be decoded: {exc}") from None
        return pixels, caption, index


# -- frozen towers: frame features computed once ------------------------------------------------


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
    from training.feature_cache import CachedTower

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


# -- evaluation --------------------------------------------------------------------------------


def video_metrics(video: torch.Tensor, text: torch.Tensor, owner: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 both ways, median ranks and RSUM; `i2t` is video-to-text, `t2i` text-to-video
    (the keys every evaluator and checkpoint selection use)."""
    metrics = retrieval_metrics(video, text, owner, median=True)
    return {**metrics, "videos": len(video), "captions": len(text)}


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


class VideoSplitEvaluator:
    """Decodes and embeds a split's videos and captions with a model, then scores them."""

    def __init__(
        self,
        dataset: str | Path,
        split: str,
        batch_size: int = 32,
        limits: VideoLimits = VideoLimits(),
    ) -> None:
        self.dataset, self.limits, self.batch_size = dataset, limits, batch_size
        self.records = load_records(dataset, split)
        if not self.records:
            raise ValueError(f"split {split!r} of {dataset} has no records")

    @torch.no_grad()
    def evaluate(self, model: VideoTwoTower, device: torch.device | str = "cpu") -> dict:
        was_training = model.training
        model.eval()
        videos, kept = [], []
        spec, count = model.image_spec, model.video_spec.frames
        for record in progress(self.records, desc="embed eval videos", leave=False):
            try:
                pixels, _ = load_clip(self.dataset, record, spec, count, self.limits)
            except (VideoError, OSError) as exc:
                log.warning("evaluation skips video %r: %s", record.id, exc)
                continue
            videos.append(model.encode_image(torch.from_numpy(pixels)[None].to(device)).cpu())
            kept.append(record)
        text, owner = _encode_captions_online(model, kept, self.batch_size, device)
        model.train(was_training)
        return video_metrics(torch.cat(videos).float(), text, owner)


def _encode_captions_online(
    model: TwoTower, records: list[Record], batch: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit caption embeddings (M, D) and each caption's video (M,)."""
    captions = [c for r in records for c in r.captions]
    owner = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
    tokenizer = TextTokenizer(model.tokenizer_json, model.text_spec.context_length)
    texts = []
    for start in range(0, len(captions), batch):
        ids, mask = tokenizer(captions[start : start + batch])
        out = model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
        texts.append(out.float().cpu())
    return torch.cat(texts), owner


# -- export ------------------------------------------------------------------------------------


class PoolingGraph(nn.Module):
    """What `video_pooling.onnx` holds: unit frame embeddings (B, N, D) and the frame mask
    (B, N) int64 -> the unit video embedding (B, D)."""

    def __init__(self, model: VideoTwoTower) -> None:
        super().__init__()
        self.pool = model.video_pool

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.pool(frames, mask > 0)


def pooling_feeds(model: VideoTwoTower, batches: tuple[int, ...], seed: int) -> list[dict]:
    """Random unit frame embeddings with masks of 1..N frames, one feed per batch size."""
    rng = np.random.default_rng(seed)
    count, dim = model.video_spec.frames, model.config.embed_dim
    feeds = []
    for batch in batches:
        frames = rng.standard_normal((batch, count, dim)).astype(np.float32)
        frames /= np.linalg.norm(frames, axis=-1, keepdims=True)
        lengths = rng.integers(1, count + 1, batch)
        mask = (np.arange(count)[None, :] < lengths[:, None]).astype(np.int64)  # (B, N)
        feeds.append({"frames": frames, "mask": mask})
    return feeds


def end_to_end_error(model: VideoTwoTower, image_onnx: Path, pooling_onnx: Path, seed: int):
    """Max |ONNX - torch| for whole videos: random frames (one video padded) through the
    image graph, then the pooling graph, against `VideoTwoTower.encode_image`."""
    from training.export import run_onnx

    rng = np.random.default_rng(seed)
    count, size = model.video_spec.frames, model.image_spec.size
    pixels = rng.standard_normal((2, count, 3, size, size)).astype(np.float32)
    pixels[1, max(1, count // 2) :] = 0.0  # the second video is shorter
    mask = pixels.reshape(2, count, -1).any(axis=-1)  # (2, N)
    frames = np.zeros((2, count, model.config.embed_dim), np.float32)
    frames[mask] = run_onnx(image_onnx, [{"pixels": pixels[mask]}])
    got = run_onnx(pooling_onnx, [{"frames": frames, "mask": mask.astype(np.int64)}])
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(pixels)).numpy()
    return float(np.abs(got - want).max())
