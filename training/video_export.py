"""A video bundle's pooling graph, `video_pooling.onnx`: unit frame embeddings and their mask
-> the unit video embedding, exported in fp32 (it is tiny) and checked against torch on random
frame embeddings and on whole videos through both graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from index_builder.video import VideoSpec
from training.onnx_graph import PARITY_BATCHES, export_onnx, parity, run_onnx
from training.video_model import VideoTwoTower


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


def end_to_end_error(
    model: VideoTwoTower, image_onnx: Path, pooling_onnx: Path, seed: int
) -> float:
    """Max |ONNX - torch| for whole videos: random frames (one video padded) through the
    image graph, then the pooling graph, against `VideoTwoTower.encode_image`."""
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


def export_video(
    model: VideoTwoTower, image_onnx: Path, tmp: Path, errors: dict[str, float], seed: int
) -> tuple[Path, VideoSpec]:
    """The pooling graph under `tmp`, with its parity on random frame embeddings
    ("video_pooling") and on whole videos through both graphs ("video") added to `errors`."""
    graph = PoolingGraph(model).eval()
    path = tmp / "video_pooling.onnx"
    export_onnx(graph, pooling_feeds(model, (2,), seed)[0], path)
    errors["video_pooling"] = parity(path, graph, pooling_feeds(model, PARITY_BATCHES, seed))
    errors["video"] = end_to_end_error(model, image_onnx, path, seed + 3)
    return path, model.video_spec
