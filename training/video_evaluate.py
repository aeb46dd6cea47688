"""Video-text retrieval scores: `video_metrics` (the keys every evaluator and checkpoint
selection use) and `VideoSplitEvaluator`, which decodes and embeds a split with a model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from index_builder.manifest import Record, load_records
from index_builder.preprocess import TextTokenizer
from index_builder.progress import progress
from index_builder.video import VideoError, VideoLimits
from training.evaluate import retrieval_metrics
from training.two_tower import TwoTower
from training.video_datasets import load_clip
from training.video_model import VideoTwoTower

log = logging.getLogger(__name__)


def video_metrics(video: torch.Tensor, text: torch.Tensor, owner: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 both ways, median ranks and RSUM; `i2t` is video-to-text, `t2i` text-to-video
    (the keys every evaluator and checkpoint selection use)."""
    metrics = retrieval_metrics(video, text, owner, median=True)
    return {**metrics, "videos": len(video), "captions": len(text)}


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
