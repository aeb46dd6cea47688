"""Ranking metrics on NumPy similarity matrices: mAP, precision@K, first-hit ranks, hits@K,
MRR, and recall@K both ways with several captions per image (Karpathy protocol).

Ties count against the query: an item that scores the same as a right one ranks ahead of
it. A collapsed model (every embedding alike) then scores zero rather than everything (the
optimistic convention of `training.evaluate`, harmless for trained checkpoints, flatters a
broken bundle); real models rarely tie."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def first_relevant_rank(sims: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """0-based rank of each query's best-ranked relevant item (Q,): how many irrelevant items
    score as high or higher. A query with no relevant item is a ValueError."""
    sims, relevant = np.asarray(sims, np.float64), np.asarray(relevant, bool)  # (Q, G)
    if sims.shape != relevant.shape:
        raise ValueError(f"sims {sims.shape} and relevant {relevant.shape} differ in shape")
    if not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant item")
    best = np.where(relevant, sims, -np.inf).max(axis=1, keepdims=True)  # (Q, 1)
    return ((sims >= best) & ~relevant).sum(axis=1)


def _pessimistic_order(sims: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Each row's gallery indices best first; among equal scores the irrelevant come first."""
    return np.lexsort((relevant, -sims), axis=1)  # the last key sorts first


def average_precision(sims: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Average precision of each query over its whole ranking (Q,), in [0, 1]."""
    sims, relevant = np.asarray(sims, np.float64), np.asarray(relevant, bool)  # (Q, G)
    if not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant item")
    order = _pessimistic_order(sims, relevant)  # (Q, G) best first
    hits = np.take_along_axis(relevant, order, axis=1).astype(np.float64)  # (Q, G)
    precision = hits.cumsum(axis=1) / np.arange(1, hits.shape[1] + 1)  # precision at each rank
    return (precision * hits).sum(axis=1) / hits.sum(axis=1)


def precision_at_k(sims: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """Fraction of each query's top K that is relevant (Q,)."""
    sims, relevant = np.asarray(sims, np.float64), np.asarray(relevant, bool)
    top = _pessimistic_order(sims, relevant)[:, :k]  # (Q, K)
    return np.take_along_axis(relevant, top, axis=1).sum(axis=1) / k


def hits_at(ranks: np.ndarray, k: int) -> int:
    """How many queries have a relevant item in their top K (0-based `ranks`)."""
    return int((np.asarray(ranks) < k).sum())


def mean_reciprocal_rank(ranks: np.ndarray) -> float:
    """Mean of 1 / (1-based rank of the first relevant item)."""
    return float(np.mean(1.0 / (np.asarray(ranks, np.float64) + 1.0)))


def owner_ranks(
    image_emb: np.ndarray,  # (N, D) unit vectors
    text_emb: np.ndarray,  # (M, D) unit vectors
    text_to_image: Sequence[int] | np.ndarray,  # (M,) index of each caption's image
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of each image's best-ranked own caption (N,) and of each caption's own
    image (M,); in chunks of queries, so memory stays at chunk x gallery. The NumPy twin of
    `training.evaluate.retrieval_ranks`, with ties counted against the query."""
    owner = np.asarray(text_to_image, np.int64)
    n_images, n_texts = len(image_emb), len(text_emb)
    if owner.shape != (n_texts,) or (n_texts and not 0 <= owner.min() <= owner.max() < n_images):
        raise ValueError("text_to_image must give an image index for every caption")
    i2t = np.empty(n_images, np.int64)
    for start in range(0, n_images, chunk):
        sims = image_emb[start : start + chunk] @ text_emb.T  # (c, M)
        own = owner[None, :] == np.arange(start, start + len(sims))[:, None]  # (c, M)
        i2t[start : start + len(sims)] = first_relevant_rank(sims, own)
    t2i = np.empty(n_texts, np.int64)
    for start in range(0, n_texts, chunk):
        sims = text_emb[start : start + chunk] @ image_emb.T  # (c, N)
        positive = np.take_along_axis(sims, owner[start : start + len(sims), None], axis=1)
        t2i[start : start + len(sims)] = (sims >= positive).sum(axis=1) - 1  # not itself
    return i2t, t2i


def recall_both_ways(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: Sequence[int] | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image-to-text: a hit at K when any of the image's captions is in the top K;
    text-to-image: when the caption's own image is. Percent, keys i2t_r{K}, t2i_r{K}, and
    rsum (their sum)."""
    i2t, t2i = owner_ranks(image_emb, text_emb, text_to_image)
    metrics = {
        f"{name}_r{k}": 100.0 * float(np.mean(ranks < k))
        for name, ranks in (("i2t", i2t), ("t2i", t2i))
        for k in ks
    }
    metrics["rsum"] = sum(metrics.values())
    return metrics
