"""Recall@K (Karpathy protocol) against a naive reference on hand-made similarities."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.evaluate import retrieval_metrics, unimodal_metrics


def naive_recall(sims: list[list[float]], owner: list[int], k: int) -> tuple[float, float]:
    n_images, n_texts = len(sims), len(owner)
    i2t_hits = 0
    for i in range(n_images):
        order = sorted(range(n_texts), key=lambda j: -sims[i][j])[:k]
        i2t_hits += any(owner[j] == i for j in order)
    t2i_hits = 0
    for j in range(n_texts):
        order = sorted(range(n_images), key=lambda i: -sims[i][j])[:k]
        t2i_hits += owner[j] in order
    return 100.0 * i2t_hits / n_images, 100.0 * t2i_hits / n_texts


def test_hand_made_case():
    # 3 images; image 0 has captions 0 and 1, image 1 has 2, image 2 has 3 and 4.
    owner = torch.tensor([0, 0, 1, 2, 2])
    image = torch.eye(3, 4)
    text = torch.tensor(
        [[0.1, 0.9, 0, 0], [0.9, 0.1, 0, 0], [0, 1.0, 0, 0], [0, 0.6, 0.4, 0], [0, 0, 0, 1.0]]
    )
    m = retrieval_metrics(image, text, owner, ks=(1, 2))
    # i2t: image 0 -> best caption 1 (own) hit@1; image 1 -> caption 0 (0.9) beats... its own
    # caption 2 scores 1.0, hit@1; image 2 -> own caption 3 (0.4) is best: hit@1.
    assert m["i2t_r1"] == pytest.approx(100.0)
    # t2i: captions 0 (-> image 1, miss@1, hit@2), 1 hit, 2 hit, 3 (image 1 first) miss@1
    # hit@2, 4 scores 0 everywhere but ties count as hits (strictly greater ranks first).
    assert m["t2i_r1"] == pytest.approx(100.0 * 3 / 5)
    assert m["t2i_r2"] == pytest.approx(100.0)
    assert m["rsum"] == pytest.approx(m["i2t_r1"] + m["i2t_r2"] + m["t2i_r1"] + m["t2i_r2"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_case_matches_naive(seed):
    gen = torch.Generator().manual_seed(seed)
    n_images = 20
    owner = torch.repeat_interleave(
        torch.arange(n_images), torch.randint(1, 5, (n_images,), generator=gen)
    )
    image = F.normalize(torch.randn(n_images, 16, generator=gen), dim=-1)
    text = F.normalize(image[owner] + 1.2 * torch.randn(len(owner), 16, generator=gen), dim=-1)
    got = retrieval_metrics(image, text, owner, chunk=7)
    sims = (image @ text.T).tolist()
    for k in (1, 5, 10):
        i2t, t2i = naive_recall(sims, owner.tolist(), k)
        assert got[f"i2t_r{k}"] == pytest.approx(i2t)
        assert got[f"t2i_r{k}"] == pytest.approx(t2i)
    assert 0 < got["i2t_r1"] < 100  # the case is neither trivial nor hopeless


def naive_ranking(sims: list[list[float]], relevant: list[list[bool]], k: int):
    """(mAP, R@K) in percent by explicit sorting of each query's gallery (self excluded)."""
    aps, hits = [], []
    for q, row in enumerate(sims):
        gallery = [g for g in range(len(row)) if g != q]
        if not any(relevant[q][g] for g in gallery):
            continue
        order = sorted(gallery, key=lambda g: (-row[g], g))
        found, precisions = 0, []
        for rank, g in enumerate(order, 1):
            if relevant[q][g]:
                found += 1
                precisions.append(found / rank)
        aps.append(sum(precisions) / len(precisions))
        hits.append(any(relevant[q][g] for g in order[:k]))
    return 100.0 * sum(aps) / len(aps), 100.0 * sum(hits) / len(hits), len(aps)


@pytest.mark.parametrize("seed", [0, 1])
def test_unimodal_metrics_match_naive(seed):
    gen = torch.Generator().manual_seed(seed)
    n_images = 24
    owner = torch.repeat_interleave(
        torch.arange(n_images), torch.randint(1, 4, (n_images,), generator=gen)
    )
    categories = [["cat", "dog", "sun", None][i % 4] for i in range(n_images)]
    centres = torch.randn(4, 16, generator=gen)
    image = F.normalize(
        centres[torch.arange(n_images) % 4] + torch.randn(n_images, 16, generator=gen), dim=-1
    )
    text = F.normalize(image[owner] + 0.8 * torch.randn(len(owner), 16, generator=gen), dim=-1)
    got = unimodal_metrics(image, text, owner, categories)
    known = [i for i, c in enumerate(categories) if c is not None]
    sims = (image[known] @ image[known].T).tolist()
    relevant = [[categories[a] == categories[b] for b in known] for a in known]
    for k in (1, 5, 10):
        mean_ap, recall, queries = naive_ranking(sims, relevant, k)
        assert got["i2i_map"] == pytest.approx(mean_ap) and got[f"i2i_r{k}"] == pytest.approx(
            recall
        )
    assert got["i2i_queries"] == queries == 18 and got["i2i_categories"] == 3
    sims = (text @ text.T).tolist()
    relevant = [[int(a) == int(b) for b in owner] for a in owner]
    for k in (1, 5, 10):
        mean_ap, recall, queries = naive_ranking(sims, relevant, k)
        assert got["t2t_map"] == pytest.approx(mean_ap) and got[f"t2t_r{k}"] == pytest.approx(
            recall
        )
    assert got["t2t_queries"] == queries == sum(int((owner == o).sum()) > 1 for o in owner)
    assert 0 < got["t2t_map"] < 100 and 0 < got["i2i_map"] < 100


def test_unimodal_without_categories_reports_text_only():
    image = torch.eye(3)
    text = torch.eye(3)[[0, 0, 1]]
    got = unimodal_metrics(image, text, torch.tensor([0, 0, 1]), [None, None, None])
    assert not any(k.startswith("i2i") for k in got)
    assert got["t2t_map"] == 100.0 and got["t2t_queries"] == 2
