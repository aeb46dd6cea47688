"""Frozen towers computed once: per-image and per-caption tower outputs, kept on disk.

With both towers frozen (trainable_blocks = 0) and in eval mode, a tower's output for an
image or caption never changes, so computing it once is exact, provided the image is seen
without augmentation (the cache holds the deterministic preprocessing's view). Only what
follows the towers then trains on rows of the cache: the projections (CPU recipes of COTS and
CLIP, which need the pooled outputs) or COOKIE's maps, shared transformer and projections
(which need the token sequences). The checkpoint still holds the whole model: those modules
are shared with it, and exporting needs no cache.

`FeatureStore` keeps each split's outputs under a key made of the dataset's fingerprint
(manifest bytes, image file sizes and times), the towers' weights (a digest of every tensor),
their architecture and the preprocessing (image spec, tokenizer, context length), so reruns,
ladder rungs and `cots eval` of frozen-tower checkpoints reuse them and anything else that
changes is a new entry. Token sequences are stored as float32 `.npy` files and memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from index_builder import paths
from index_builder.atomic import atomic_write_json
from index_builder.data.merge import merged_galleries
from index_builder.manifest import Record, image_path, manifest_path
from index_builder.preprocess import TextTokenizer, load_image, preprocess_image, sha256_file
from index_builder.progress import progress
from training.evaluate import retrieval_metrics, split_records
from training.sources import per_gallery_metrics
from training.towers.weights import tensor_digest
from training.two_tower import TwoTower

log = logging.getLogger(__name__)
VERSION = 1
META = "meta.json"
ARRAYS = ("image_pooled", "text_pooled", "text_lengths", "owner")
TOKEN_ARRAYS = ("image_tokens", "text_tokens")
# Model config keys that do not change what the towers output (the weights count through
# their digest, the tokenizer through its file's hash; the rest follows the towers).
NOT_TOWER = ("name", "embed_dim", "tokenizer", "image_weights", "text_weights")
NOT_TOWER += ("semantic_classes", "semantic_temperature", "semantic_top", "semantic_lock_text")


def default_root() -> Path:
    return paths.home() / "cache" / "features"


@dataclass
class SplitFeatures:
    """Tower outputs of one split: row i of the image arrays is record i, row j of the text
    arrays is caption j (captions in record order)."""

    image_pooled: torch.Tensor  # (N, Wi)
    text_pooled: torch.Tensor  # (M, Wt)
    text_lengths: np.ndarray  # (M,) real tokens per caption
    owner: torch.Tensor  # (M,) record index of each caption
    image_tokens: np.ndarray | None = None  # (N, n, Wi), memory-mapped when on disk
    text_tokens: np.ndarray | None = None  # (M, L, Wt), L = the split's longest caption

    def caption_rows(self) -> list[list[int]]:
        """The caption rows of each record."""
        rows: list[list[int]] = [[] for _ in range(len(self.image_pooled))]
        for row, record in enumerate(self.owner.tolist()):
            rows[record].append(row)
        return rows

    def text_mask(self, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), L) int64 attention mask of those caption rows."""
        width = self.text_tokens.shape[1] if self.text_tokens is not None else 1
        length = torch.from_numpy(self.text_lengths[rows])[:, None]
        return (torch.arange(width)[None, :] < length).long()


def dataset_fingerprint(dataset: str | Path, split: str) -> str:
    """sha256 of the manifest's bytes, the split name and each of its images' size and mtime."""
    digest = hashlib.sha256(manifest_path(dataset).read_bytes())
    digest.update(split.encode())
    for record in split_records(dataset, split):
        stat = image_path(dataset, record).stat()
        digest.update(f"{record.id}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def cache_key(model: TwoTower, dataset: str | Path, split: str) -> dict[str, Any]:
    """Everything the cached outputs depend on."""
    config = model.config.to_dict()
    towers = {k: v for k, v in config.items() if k not in NOT_TOWER and not k.startswith("shared_")}
    towers = {k: v for k, v in towers.items() if not k.endswith("_trainable_blocks")}
    return {
        "version": VERSION,
        "dataset": dataset_fingerprint(dataset, split),
        "image_tower": tensor_digest(model.image_tower),
        "text_tower": tensor_digest(model.text_tower),
        "towers": json.loads(json.dumps(towers)),
        "image_spec": model.image_spec.to_dict(),
        "tokenizer": sha256_file(model.tokenizer_json),
    }


class FeatureStore:
    """Split features by `cache_key`, computed once; `root=None` keeps them in memory only."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = None if root is None else Path(root)

    def load(
        self, model: TwoTower, dataset: str | Path, split: str, tokens: bool, batch: int = 64
    ) -> SplitFeatures:
        """The split's tower outputs (token sequences too when `tokens`)."""
        if self.root is None:
            return encode_split(model, dataset, split, tokens, batch, None)
        galleries = merged_galleries(dataset)
        if galleries is not None and not tokens and _same_records(dataset, galleries, split):
            # a merge of galleries: their own entries, shared with every other merge of them
            parts = [self.load(model, g, split, tokens, batch) for g in galleries]
            return concat_features(parts)
        key = cache_key(model, dataset, split)
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        entry = self.root / name
        if (entry / META).is_file():
            meta = json.loads((entry / META).read_text(encoding="utf-8"))
            if meta["tokens"] or not tokens:
                log.info("feature cache hit: %s %s (%s)", dataset, split, entry)
                return read_entry(entry, tokens)
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        encode_split(model, dataset, split, tokens, batch, tmp)
        atomic_write_json(tmp / META, {"key": key, "tokens": tokens, "split": split})
        old = self.root / f".{name}.old-{os.getpid()}"
        if entry.exists():  # an entry without the token sequences: replaced by this one
            os.replace(entry, old)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process (a rank) put the same entry in place first
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        return read_entry(entry, tokens)

    def embed(
        self,
        model: TwoTower,
        dataset: str | Path,
        split: str,
        tokens: bool,
        batch: int = 64,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's image (N, D) and caption (M, D) embeddings through `model`, from its
        cached tower outputs (`evaluate.SplitEmbedder`)."""
        feats = self.load(model, dataset, split, tokens, batch)
        return embed_features(model.to(device), feats, device)


def _same_records(dataset: str | Path, galleries: list[Path], split: str) -> bool:
    """Whether the merged split holds exactly its galleries' records, in order (a gallery
    rebuilt since the merge no longer does)."""
    ids = [r.id for g in galleries for r in split_records(g, split)]
    return ids == [r.id for r in split_records(dataset, split)]


def concat_features(parts: list[SplitFeatures]) -> SplitFeatures:
    """The pooled features of several splits as one, records in order."""
    offsets = np.cumsum([0] + [len(p.image_pooled) for p in parts[:-1]])
    return SplitFeatures(
        image_pooled=torch.cat([p.image_pooled for p in parts]),
        text_pooled=torch.cat([p.text_pooled for p in parts]),
        text_lengths=np.concatenate([p.text_lengths for p in parts]),
        owner=torch.cat([p.owner + int(o) for p, o in zip(parts, offsets, strict=True)]),
    )


def read_entry(entry: Path, tokens: bool) -> SplitFeatures:
    arrays = {name: np.load(entry / f"{name}.npy") for name in ARRAYS}
    feats = SplitFeatures(
        image_pooled=torch.from_numpy(arrays["image_pooled"]),
        text_pooled=torch.from_numpy(arrays["text_pooled"]),
        text_lengths=arrays["text_lengths"],
        owner=torch.from_numpy(arrays["owner"]),
    )
    if tokens:
        feats.image_tokens = np.load(entry / "image_tokens.npy", mmap_mode="r")
        feats.text_tokens = np.load(entry / "text_tokens.npy", mmap_mode="r")
    return feats


def _array(out: Path | None, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array to fill: an .npy file mapped into memory, or plain memory."""
    if out is None:
        return np.empty(shape, dtype=np.float32)
    return np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape)


@torch.no_grad()
def encode_split(
    model: TwoTower,
    dataset: str | Path,
    split: str,
    tokens: bool,
    batch: int = 64,
    out: Path | None = None,
) -> SplitFeatures:
    """Run both (eval-mode) towers over a split; with `out`, write the arrays there."""
    was_training = model.training
    model.eval()
    records = split_records(dataset, split)
    if not records:
        raise ValueError(f"split {split!r} of {dataset} has no records")
    image_pooled, image_tokens = encode_images(model, dataset, records, split, tokens, batch, out)
    text = encode_captions(model, records, split, tokens, batch * 2, out)
    model.train(was_training)
    if out is not None:
        for array in (image_pooled, image_tokens, text.pooled, text.tokens):
            if isinstance(array, np.memmap):
                array.flush()
    return SplitFeatures(
        torch.from_numpy(np.array(image_pooled)),
        torch.from_numpy(np.array(text.pooled)),
        text.lengths,
        torch.from_numpy(text.owner),
        image_tokens,
        text.tokens,
    )


def encode_images(
    model: TwoTower,
    dataset: str | Path,
    records: list[Record],
    split: str,
    tokens: bool,
    batch: int,
    out: Path | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The image tower's pooled outputs (N, W) and, with `tokens`, token sequences (N, n, W)
    of the records' images (the deterministic preprocessing's view)."""
    spec, n = model.image_spec, len(records)
    pooled = sequences = None
    for start in progress(range(0, n, batch), f"encode {split} images", unit="batch", leave=False):
        chunk = records[start : start + batch]
        images = [load_image(image_path(dataset, r), spec.background) for r in chunk]
        pixels = np.stack([preprocess_image(image, spec) for image in images])
        feats = model.image_features(torch.from_numpy(pixels))
        if pooled is None:
            pooled = _array(out, "image_pooled", (n, feats["pooled"].shape[-1]))
            if tokens:
                sequences = _array(out, "image_tokens", (n, *feats["tokens"].shape[1:]))
        pooled[start : start + len(chunk)] = feats["pooled"].float().numpy()
        if sequences is not None:
            sequences[start : start + len(chunk)] = feats["tokens"].float().numpy()
    assert pooled is not None  # the split has records
    return pooled, sequences


@dataclass
class CaptionFeatures:
    """The text tower's outputs over a split's captions (record order)."""

    pooled: np.ndarray  # (M, W)
    tokens: np.ndarray | None  # (M, L, W), L = the longest caption
    lengths: np.ndarray  # (M,) real tokens per caption
    owner: np.ndarray  # (M,) record index of each caption


def encode_captions(
    model: TwoTower,
    records: list[Record],
    split: str,
    tokens: bool,
    batch: int,
    out: Path | None,
) -> CaptionFeatures:
    """The text tower over every caption of the records, padding cut at the longest caption;
    with `out`, the lengths and owners are written there too."""
    captions = [c for r in records for c in r.captions]
    owner = np.array([i for i, r in enumerate(records) for _ in r.captions], dtype=np.int64)
    ids, mask = TextTokenizer(model.tokenizer_json, model.text_spec.context_length)(captions)
    lengths = mask.sum(1).astype(np.int64)  # (M,)
    longest = int(lengths.max())  # padding beyond it is masked out: dropping it is exact
    ids, mask = torch.from_numpy(ids[:, :longest]), torch.from_numpy(mask[:, :longest])
    width = model.text_tower.width
    pooled = _array(out, "text_pooled", (len(captions), width))
    sequences = _array(out, "text_tokens", (len(captions), longest, width)) if tokens else None
    for start in progress(
        range(0, len(captions), batch), f"encode {split} captions", unit="batch", leave=False
    ):
        part = slice(start, start + batch)
        feats = model.text_features(ids[part], mask[part])
        pooled[part] = feats["pooled"].float().numpy()
        if sequences is not None:
            sequences[part] = feats["tokens"].float().numpy()
    if out is not None:
        np.save(out / "text_lengths.npy", lengths)
        np.save(out / "owner.npy", owner)
    return CaptionFeatures(pooled, sequences, lengths, owner)


class CachedTower(nn.Module):
    """Stands in for a frozen tower: row `index` of precomputed outputs (pooled, and the
    token sequence when cached)."""

    def __init__(self, pooled: torch.Tensor, tokens: np.ndarray | None = None) -> None:
        super().__init__()
        # Plain attributes, not buffers: no copy in every momentum update or checkpoint.
        self.pooled, self.tokens = pooled, tokens  # (N, W), (N, n, W)
        self.width = pooled.shape[1]

    def forward(self, index: torch.Tensor, *_: object) -> dict[str, torch.Tensor]:
        rows = index.reshape(index.shape[0], -1)[:, 0].cpu()  # (B,)
        out = {"pooled": self.pooled[rows].to(index.device)}  # (B, W)
        if self.tokens is not None:  # fancy indexing copies the rows out of the memory map
            out["tokens"] = torch.from_numpy(self.tokens[rows.numpy()]).to(index.device)
        return out


def cached_model(model: TwoTower, feats: SplitFeatures) -> TwoTower:
    """A TwoTower over cached outputs sharing every trainable module of `model` (projections,
    and COOKIE's maps and shared transformer); `.source` is `model`."""
    cached = TwoTower(
        model.config,
        CachedTower(feats.image_pooled, feats.image_tokens),
        CachedTower(feats.text_pooled, feats.text_tokens),
        model.tokenizer_json,
    )
    cached.image_proj, cached.text_proj = model.image_proj, model.text_proj
    cached.image_map, cached.text_map, cached.shared = model.image_map, model.text_map, model.shared
    cached.semantic, cached.semantic_proj = model.semantic, model.semantic_proj
    object.__setattr__(cached, "source", model)  # not a submodule: never saved twice
    return cached


class CaptionDraw(Dataset):
    """Item i: cached row i and one of its caption rows, drawn afresh each epoch (seeded by
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


class CachedPairDataset(CaptionDraw):
    """Image row i of the cache and one of its caption rows (`CaptionDraw`)."""

    def __init__(self, feats: SplitFeatures, seed: int = 0) -> None:
        super().__init__(feats.caption_rows(), seed)
        self.feats = feats

    def collate(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        image, caption = torch.tensor(items).T  # (B,), (B,)
        return {
            "pixels": image,  # row of the image cache
            "input_ids": caption[:, None],  # (B, 1) row of the caption cache
            "attention_mask": self.feats.text_mask(caption.numpy()),  # (B, L) its real tokens
            "index": image,
        }


@torch.no_grad()
def embed_features(
    model: TwoTower, feats: SplitFeatures, device: torch.device | str = "cpu", batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (image (N, D), text (M, D)) of cached tower outputs through `model`'s
    trainable part: what `model.encode_image` / `encode_text` give on the raw inputs."""
    was_training = model.training
    model.eval()
    images, texts = [], []
    for start in range(0, len(feats.image_pooled), batch):
        rows = np.arange(start, min(start + batch, len(feats.image_pooled)))
        out = {"pooled": feats.image_pooled[rows].to(device)}
        if feats.image_tokens is not None:
            out["tokens"] = torch.from_numpy(feats.image_tokens[rows]).to(device)
        images.append(model.embed_image(out).float().cpu())
    for start in range(0, len(feats.text_pooled), batch):
        rows = np.arange(start, min(start + batch, len(feats.text_pooled)))
        out = {"pooled": feats.text_pooled[rows].to(device)}
        if feats.text_tokens is not None:
            out["tokens"] = torch.from_numpy(feats.text_tokens[rows]).to(device)
        mask = feats.text_mask(rows).to(device)
        texts.append(model.embed_text(out, mask).float().cpu())
    model.train(was_training)
    return torch.cat(images), torch.cat(texts)


class CachedEvaluator:
    """SplitEvaluator's interface over cached validation features (same metrics; with the
    records' `galleries` of a merged dataset, each gallery's too)."""

    def __init__(self, feats: SplitFeatures, galleries: np.ndarray | None = None) -> None:
        self.feats, self.galleries = feats, galleries

    def evaluate(self, model: TwoTower, device: torch.device | str = "cpu") -> dict[str, float]:
        image, text = embed_features(model, self.feats, device)
        metrics = retrieval_metrics(image, text, self.feats.owner)
        if self.galleries is not None:
            metrics |= per_gallery_metrics(image, text, self.feats.owner, self.galleries)
        return {**metrics, "images": len(image), "captions": len(text)}
