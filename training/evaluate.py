"""Retrieval metrics on a manifest split: recall@K both ways and RSUM (Karpathy: several
captions per image), and unimodal retrieval (image-to-image by category, text-to-text among
the captions of one image) as mAP and R@K."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from index_builder.manifest import Record, image_path, load_records
from index_builder.preprocess import TextTokenizer, load_image, preprocess_image
from index_builder.progress import progress

KS = (1, 5, 10)


class SplitEmbedder(Protocol):
    """What embeds a split without running the towers (`training.feature_cache.FeatureStore`:
    their outputs cached): image (N, D) and caption (M, D) embeddings through `model`."""

    def embed(
        self,
        model: Any,
        dataset: str | Path,
        split: str,
        tokens: bool,
        batch: int,
        device: torch.device | str,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@torch.no_grad()
def retrieval_ranks(
    image_emb: torch.Tensor,  # (N, D) normalised
    text_emb: torch.Tensor,  # (M, D) normalised
    text_to_image: torch.Tensor,  # (M,) index of each caption's image
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks: of each image's best-ranked own caption (N,), of each caption's own
    image (M,)."""
    n_images = image_emb.shape[0]
    text_to_image = text_to_image.long()
    i2t_rank = torch.empty(n_images, dtype=torch.long)
    for start in range(0, n_images, chunk):
        sims = image_emb[start : start + chunk] @ text_emb.T  # (c, M)
        own = text_to_image[None, :] == torch.arange(start, start + sims.shape[0])[:, None]
        best_own = sims.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values  # (c, 1)
        i2t_rank[start : start + sims.shape[0]] = (sims > best_own).sum(dim=1)
    t2i_rank = torch.empty(text_emb.shape[0], dtype=torch.long)
    for start in range(0, text_emb.shape[0], chunk):
        sims = text_emb[start : start + chunk] @ image_emb.T  # (c, N)
        own_image = text_to_image[start : start + sims.shape[0]]
        positive = sims.gather(1, own_image[:, None])  # (c, 1)
        t2i_rank[start : start + sims.shape[0]] = (sims > positive).sum(dim=1)
    return i2t_rank, t2i_rank


@torch.no_grad()
def retrieval_metrics(
    image_emb: torch.Tensor,  # (N, D) normalised
    text_emb: torch.Tensor,  # (M, D) normalised
    text_to_image: torch.Tensor,  # (M,) index of each caption's image
    ks: Sequence[int] = KS,
    chunk: int = 1024,
    median: bool = False,
) -> dict[str, float]:
    """Image-to-text: a hit at K when any of the image's captions ranks in the top K.
    Text-to-image: a hit when the caption's own image ranks in the top K. Percentages; with
    `median`, also the median 1-based rank each way (`i2t_medr`, `t2i_medr`)."""
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image, chunk)
    ranks = {"i2t": i2t, "t2i": t2i}
    metrics: dict[str, float] = {}
    for name, rank in ranks.items():
        for k in ks:
            metrics[f"{name}_r{k}"] = 100.0 * float((rank < k).float().mean())
    metrics["rsum"] = sum(metrics[f"{name}_r{k}"] for name in ("i2t", "t2i") for k in ks)
    if median:
        for name, rank in ranks.items():
            metrics[f"{name}_medr"] = float(np.median(rank.numpy() + 1))
    return metrics


@torch.no_grad()
def ranking_metrics(
    sims: torch.Tensor,  # (Q, G) query-gallery similarities
    relevant: torch.Tensor,  # (Q, G) bool
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """mAP (average precision over each query's full ranking, ties broken by gallery order)
    and R@K (a relevant item in the top K), in percent; queries with no relevant item and
    gallery entries with similarity -inf (the query itself) are left out."""
    has = relevant.any(1)
    sims, relevant = sims[has], relevant[has]
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices  # (Q, G)
    hits = relevant.gather(1, order).float()  # (Q, G) relevance in rank order
    hits = hits * (sims.gather(1, order) > float("-inf")).float()
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float32)  # (G,)
    precision = hits.cumsum(1) / ranks  # (Q, G) precision at each rank
    ap = (precision * hits).sum(1) / hits.sum(1)  # (Q,)
    metrics = {"map": 100.0 * float(ap.mean()) if len(ap) else float("nan")}
    for k in ks:
        metrics[f"r{k}"] = 100.0 * float((hits[:, :k].sum(1) > 0).float().mean())
    metrics["queries"] = int(has.sum())
    return metrics


def unimodal_metrics(
    image_emb: torch.Tensor,  # (N, D) normalised
    text_emb: torch.Tensor,  # (M, D) normalised
    text_to_image: torch.Tensor,  # (M,) index of each caption's image
    categories: Sequence[str | None],  # (N,) each image's category, None = unknown
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Image-to-image: every image with a category queries the other images with one; those
    of its category are relevant. Text-to-text: every caption queries the other captions;
    those of the same image are relevant (captions that are their image's only one ask
    nothing). Keys i2i_map, i2i_r1, ..., t2t_map, t2t_r1, ... (percent) and query counts."""
    metrics: dict[str, float] = {}
    known = torch.tensor([c is not None for c in categories], dtype=torch.bool)
    if int(known.sum()) > 1:
        names = sorted({c for c in categories if c is not None})
        ids = torch.tensor([names.index(c) if c is not None else -1 for c in categories])
        emb, cat = image_emb[known], ids[known]
        sims = (emb @ emb.T).fill_diagonal_(float("-inf"))
        relevant = (cat[:, None] == cat[None, :]).fill_diagonal_(False)
        metrics |= {f"i2i_{k}": v for k, v in ranking_metrics(sims, relevant, ks).items()}
        metrics["i2i_categories"] = len(names)
    owner = text_to_image.long()
    sims = (text_emb @ text_emb.T).fill_diagonal_(float("-inf"))
    relevant = (owner[:, None] == owner[None, :]).fill_diagonal_(False)
    metrics |= {f"t2t_{k}": v for k, v in ranking_metrics(sims, relevant, ks).items()}
    return metrics


def split_records(dataset: str | Path, split: str) -> list[Record]:
    """The records of a split, or of every split for `split="all"` (a gallery never trained
    on, evaluated whole)."""
    return load_records(dataset, None if split == "all" else split)


def split_pairs(dataset: str | Path, split: str) -> tuple[list[Record], list[str], list[int]]:
    """Records of a split, all their captions flattened, and each caption's image index."""
    records = split_records(dataset, split)
    if not records:
        raise ValueError(f"split {split!r} of {dataset} has no records")
    captions = [c for r in records for c in r.captions]
    owners = [i for i, r in enumerate(records) for _ in r.captions]
    return records, captions, owners


class SplitEvaluator:
    """Embeds one split with a model and scores it; the decoded pixels are kept between calls
    (evaluation uses the deterministic preprocessing, so they never change)."""

    def __init__(
        self, dataset: str | Path, split: str, batch_size: int = 128, max_images: int = 0
    ) -> None:
        self.dataset = dataset
        self.records, self.captions, owners = split_pairs(dataset, split)
        if max_images:
            self.records = self.records[:max_images]
            keep = [j for j, o in enumerate(owners) if o < len(self.records)]
            self.captions = [self.captions[j] for j in keep]
            owners = [owners[j] for j in keep]
        self.text_to_image = torch.tensor(owners)
        self.batch_size = batch_size
        self._pixels: np.ndarray | None = None

    def _load_pixels(self, spec) -> np.ndarray:
        if self._pixels is None or self._pixels.shape[-1] != spec.size:
            self._pixels = np.stack(
                [
                    preprocess_image(load_image(image_path(self.dataset, r), spec.background), spec)
                    for r in progress(self.records, desc="decode eval images", leave=False)
                ]
            )
        return self._pixels

    @torch.no_grad()
    def embed(self, model, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        was_training = model.training
        model.eval()
        pixels = self._load_pixels(model.image_spec)
        tokenizer = TextTokenizer(model.tokenizer_json, model.text_spec.context_length)
        images, texts = [], []
        for start in range(0, len(pixels), self.batch_size):
            batch = torch.from_numpy(pixels[start : start + self.batch_size]).to(device)
            images.append(model.encode_image(batch).float().cpu())
        for start in range(0, len(self.captions), self.batch_size):
            ids, mask = tokenizer(self.captions[start : start + self.batch_size])
            out = model.encode_text(
                torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
            )
            texts.append(out.float().cpu())
        model.train(was_training)
        return torch.cat(images), torch.cat(texts)

    def evaluate(self, model, device: torch.device | str = "cpu") -> dict[str, float]:
        image_emb, text_emb = self.embed(model, device)
        metrics = retrieval_metrics(image_emb, text_emb, self.text_to_image)
        return {**metrics, "images": len(self.records), "captions": len(self.captions)}


def score_split(
    model,
    dataset: str | Path,
    split: str,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    store: SplitEmbedder | None = None,
    cache_tokens: bool = False,
) -> dict[str, float]:
    """Cross-modal and unimodal metrics of `model` on a split. With a `FeatureStore` the
    tower outputs come from (or go to) its cache: exact for any tower in eval mode, and
    shared by every checkpoint whose towers kept their pretrained weights (`cache_tokens`:
    store the token sequences even if this model does not read them)."""
    from training.categories import record_category

    evaluator = SplitEvaluator(dataset, split, batch_size)
    if store is None:
        image_emb, text_emb = evaluator.embed(model, device)
    else:
        tokens = cache_tokens or model.shared is not None
        image_emb, text_emb = store.embed(model, dataset, split, tokens, batch_size, device)
    categories = [record_category(r) for r in evaluator.records]
    return {
        **retrieval_metrics(image_emb, text_emb, evaluator.text_to_image),
        **unimodal_metrics(image_emb, text_emb, evaluator.text_to_image, categories),
        "images": len(evaluator.records),
        "captions": len(evaluator.captions),
    }
