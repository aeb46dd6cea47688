"""Image-caption pairs of a manifest split for training: augmentation, caption choice, collation."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from index_builder.manifest import image_path, load_records
from index_builder.preprocess import ImageSpec, TextTokenizer, load_image, preprocess_image


def random_resized_crop(
    image: Image.Image,
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> Image.Image:
    """Crop a random box of `scale` x area and `ratio` aspect (Inception / torchvision
    RandomResizedCrop); preprocess_image then resizes it to the model's input size.

    No flips and no colour jitter: captions say "left", "arrow pointing right", "red".
    """
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return image.crop((left, top, left + w, top + h))
    return image  # fall back to the whole image, like torchvision's centre fallback


class PairDataset(Dataset):
    """Item i is image i of the split with one of its captions, drawn afresh each epoch.

    Caption and crop come from a generator seeded by (seed, epoch, i): a resumed run
    sees exactly the samples the uninterrupted run would have seen.
    """

    def __init__(
        self,
        dataset: str | Path,
        split: str,
        spec: ImageSpec,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.7, 1.0),
        crop_ratio: tuple[float, float] = (0.75, 4 / 3),
        seed: int = 0,
    ) -> None:
        self.dataset = dataset
        self.records = load_records(dataset, split)
        if not self.records:
            raise ValueError(f"split {split!r} of {dataset} has no records")
        self.spec = spec
        self.augment = augment
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, int]:
        record = self.records[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        caption = record.captions[int(rng.integers(len(record.captions)))]
        image = load_image(image_path(self.dataset, record), self.spec.background)
        if self.augment:
            image = random_resized_crop(image, rng, self.crop_scale, self.crop_ratio)  # type: ignore[arg-type]
        return preprocess_image(image, self.spec), caption, index


class Collate:
    """Stacks pixels and tokenises the captions with the model's tokenizer (in the worker)."""

    def __init__(self, tokenizer_json: str | Path, context_length: int) -> None:
        self.tokenizer_json, self.context_length = str(tokenizer_json), context_length
        self._tokenizer: TextTokenizer | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}  # rebuilt in each worker

    def __call__(self, items: Sequence[tuple[np.ndarray, str, int]]) -> dict[str, torch.Tensor]:
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.tokenizer_json, self.context_length)
        pixels, captions, indices = zip(*items, strict=True)
        ids, mask = self._tokenizer(list(captions))
        return {
            "pixels": torch.from_numpy(np.stack(pixels)),  # (B, 3, S, S)
            "input_ids": torch.from_numpy(ids),  # (B, L)
            "attention_mask": torch.from_numpy(mask),  # (B, L)
            "index": torch.tensor(indices),  # (B,) image index in the split
        }


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks, able to start mid-epoch on resume.

    Every rank gets `per_rank` indices (the tail that does not fill a global batch is
    dropped, so all ranks run the same number of steps).
    """

    def __init__(
        self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> None:
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.per_rank = (size // (batch_size * world_size)) * batch_size
        if self.per_rank == 0:
            raise ValueError(
                f"{size} training pairs cannot fill one batch of {batch_size} x {world_size} "
                "processes; lower data.batch_size"
            )
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """`skip`: samples of this rank already consumed in this epoch (resume)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )
        mine = order[self.rank :: self.world_size][: self.per_rank]
        return iter(mine[self.skip :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.skip
