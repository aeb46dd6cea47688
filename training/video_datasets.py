"""Video-caption training sets: decoded clips (`VideoPairDataset`), and the check that a
recipe's media (video or image) matches its gallery's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from index_builder.manifest import Record, image_path, load_records
from index_builder.preprocess import ImageSpec
from index_builder.video import VideoError, VideoLimits, decode_video, is_video_path, video_pixels


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
