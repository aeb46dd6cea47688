"""Frozen towers computed once: pooled features cached per image and per caption (CPU recipe).

With both towers frozen (trainable_blocks = 0) and in eval mode, a tower's pooled output for an
image or caption never changes, so computing it once is exact, provided the image is seen
without augmentation (the cache holds the deterministic preprocessing's view). Only the
projections (online and momentum) then train, on rows of the cache. The checkpoint still holds
the whole model: the projections are shared with it, and exporting needs no cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from index_builder.manifest import image_path, load_records
from index_builder.preprocess import TextTokenizer, load_image, preprocess_image
from training.evaluate import retrieval_metrics
from training.model import TwoTower

log = logging.getLogger(__name__)


class CachedTower(nn.Module):
    """Stands in for a frozen tower: row `index` of precomputed pooled features."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        # A plain attribute, not a buffer: no copy in every momentum update or checkpoint.
        self.features = features  # (N, W)
        self.width = features.shape[1]

    def forward(self, index: torch.Tensor, *_: object) -> dict[str, torch.Tensor]:
        rows = index.reshape(index.shape[0], -1)[:, 0].cpu()  # (B,)
        return {"pooled": self.features[rows].to(index.device)}  # (B, W)


def cached_model(model: TwoTower, image_feats: torch.Tensor, text_feats: torch.Tensor) -> TwoTower:
    """A TwoTower over cached features sharing `model`'s projections; `.source` is `model`."""
    cached = TwoTower(
        model.config, CachedTower(image_feats), CachedTower(text_feats), model.tokenizer_json
    )
    cached.image_proj, cached.text_proj = model.image_proj, model.text_proj
    object.__setattr__(cached, "source", model)  # not a submodule: never saved twice
    return cached


@torch.no_grad()
def encode_split(model: TwoTower, dataset: str | Path, split: str, batch: int = 64):
    """Pooled tower features of a split -> (image (N, Wi), text (M, Wt), caption owner (M,),
    captions per record as lists of caption rows)."""
    if model.config.image_trainable_blocks != 0 or model.config.text_trainable_blocks != 0:
        raise ValueError("feature caching needs both towers frozen (trainable_blocks=0)")
    model.eval()
    records = load_records(dataset, split)
    spec = model.image_spec
    images = []
    for start in tqdm(range(0, len(records), batch), desc=f"cache {split} images", leave=False):
        chunk = records[start : start + batch]
        pixels = np.stack(
            [
                preprocess_image(load_image(image_path(dataset, r), spec.background), spec)
                for r in chunk
            ]
        )
        images.append(model.image_features(torch.from_numpy(pixels))["pooled"])
    captions = [c for r in records for c in r.captions]
    owner = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
    tokenizer = TextTokenizer(model.tokenizer_json, model.text_spec.context_length)
    texts = []
    for start in tqdm(
        range(0, len(captions), batch * 2), desc=f"cache {split} captions", leave=False
    ):
        ids, mask = tokenizer(captions[start : start + batch * 2])
        texts.append(model.text_features(torch.from_numpy(ids), torch.from_numpy(mask))["pooled"])
    rows, offset = [], 0
    for r in records:
        rows.append(list(range(offset, offset + len(r.captions))))
        offset += len(r.captions)
    return torch.cat(images), torch.cat(texts), owner, rows


class CachedPairDataset(Dataset):
    """Item i: image row i and one of its caption rows, drawn afresh each epoch (seeded by
    (seed, epoch, i) as in PairDataset)."""

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
        image, caption = torch.tensor(items).T  # (B,), (B,)
        return {
            "pixels": image,  # row of the image cache
            "input_ids": caption[:, None],  # (B, 1) row of the caption cache
            "attention_mask": torch.ones(len(items), 1, dtype=torch.long),
            "index": image,
        }


class CachedEvaluator:
    """SplitEvaluator's interface over cached validation features (same metrics)."""

    def __init__(self, image_feats: torch.Tensor, text_feats: torch.Tensor, owner: torch.Tensor):
        self.image_feats, self.text_feats, self.text_to_image = image_feats, text_feats, owner

    @torch.no_grad()
    def evaluate(self, model: TwoTower, device: torch.device | str = "cpu") -> dict[str, float]:
        image = F.normalize(model.image_proj(self.image_feats.to(device)), dim=-1).cpu()
        text = F.normalize(model.text_proj(self.text_feats.to(device)), dim=-1).cpu()
        metrics = retrieval_metrics(image, text, self.text_to_image)
        return {**metrics, "images": len(image), "captions": len(text)}
