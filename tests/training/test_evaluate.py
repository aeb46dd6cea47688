"""Recall@K (Karpathy protocol) against a naive reference on hand-made similarities."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.evaluate import retrieval_metrics


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
