"""Training on several galleries at once (`cots data merge`): per-gallery sampling weights
and per-gallery validation metrics. A record's gallery is its `meta.gallery`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from index_builder.data.merge import GALLERY_KEY
from index_builder.manifest import Record
from training.evaluate import retrieval_metrics


def record_galleries(records: list[Record]) -> np.ndarray:
    """(N,) gallery name of each record ("" for a record of a single-gallery dataset)."""
    return np.array([str(r.meta.get(GALLERY_KEY, "")) for r in records])


def check_weights(weights: dict[str, float], galleries: np.ndarray) -> None:
    """Every weighted gallery exists and every weight is >= 0 (ValueError otherwise)."""
    present = sorted(set(galleries.tolist()) - {""})
    unknown = sorted(set(weights) - set(present))
    if unknown:
        raise ValueError(
            f"data.gallery_weights names {', '.join(unknown)}, not in the dataset "
            f"(its galleries: {', '.join(present) or 'none; build one with cots data merge'})"
        )
    negative = [name for name, w in weights.items() if not w >= 0]
    if negative:
        raise ValueError(f"data.gallery_weights must be >= 0: {', '.join(negative)}")


class WeightedGalleries(Dataset):
    """A training set drawn per epoch by gallery: weight w keeps round(w * n) of a gallery's
    n records (w < 1: a fresh subset each epoch; w > 1: every record, some twice or more);
    unweighted galleries keep weight 1. Item i of an epoch is item `rows[i]` of `dataset`."""

    def __init__(
        self, dataset: Any, galleries: np.ndarray, weights: dict[str, float], seed: int
    ) -> None:
        check_weights(weights, galleries)
        self.dataset, self.seed = dataset, seed
        self.members = {g: np.flatnonzero(galleries == g) for g in sorted(set(galleries.tolist()))}
        self.counts = {g: round(weights.get(g, 1.0) * len(m)) for g, m in self.members.items()}
        self.rows = self._draw(0)
        self.collate = getattr(dataset, "collate", None)

    def _draw(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, epoch, 7))
        parts = []
        for gallery, members in self.members.items():
            whole, rest = divmod(self.counts[gallery], len(members))
            parts += [members] * whole + [rng.choice(members, rest, replace=False)]
        return np.concatenate(parts)

    def set_epoch(self, epoch: int) -> None:
        self.rows = self._draw(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[int(self.rows[index])]


def per_gallery_metrics(
    image: torch.Tensor, text: torch.Tensor, owner: torch.Tensor, galleries: np.ndarray
) -> dict[str, float]:
    """`<gallery>/<metric>` for each gallery of a merged split, each scored on its own."""
    out: dict[str, float] = {}
    names = sorted(set(galleries.tolist()) - {""})
    for name in names if len(names) > 1 else []:
        images = torch.from_numpy(np.flatnonzero(galleries == name))
        remap = torch.full((len(image),), -1, dtype=torch.long)
        remap[images] = torch.arange(len(images))
        captions = remap[owner] >= 0
        metrics = retrieval_metrics(image[images], text[captions], remap[owner][captions])
        out |= {f"{name}/{key}": value for key, value in metrics.items()}
    return out
