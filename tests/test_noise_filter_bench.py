"""bench/noise_filter.py's scoring of the filter's decisions, against naive references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bench import noise_filter


def _naive_auc(score, positive):
    pairs = list(itertools.product(score[positive], score[~positive]))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_the_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    score = rng.integers(0, 6, size=40).astype(float)  # many ties
    positive = rng.random(40) < 0.3
    assert noise_filter._auc(score, positive) == pytest.approx(_naive_auc(score, positive))
    assert noise_filter._auc(score, np.zeros(40, dtype=bool)) is None


def _decisions():
    return [
        (torch.tensor([0, 1]), torch.tensor([1.0, 1.0]), None),  # warm-up: ignored
        (torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), torch.tensor([0.1, -2.5])),
        (torch.tensor([2, 3]), torch.tensor([0.0, 1.0]), torch.tensor([-2.2, -1.2])),
    ]


def test_scores_count_only_active_decisions_and_sweep_lambda():
    arrays = noise_filter.decision_arrays(_decisions(), {1, 3})
    assert arrays["batch"].tolist() == [1, 1, 2, 2] and arrays["noisy"].tolist() == [0, 1, 0, 1]
    scores = noise_filter.filter_scores(arrays)
    assert scores["decisions"] == 4 and scores["noisy_share"] == 0.5
    assert (scores["dropped"], scores["precision"], scores["recall"]) == (2, 0.5, 0.5)
    assert scores["by_lambda"]["1.0"] == {"dropped": 3, "precision": 2 / 3, "recall": 1.0}
    assert scores["by_lambda"]["3.0"] == {"dropped": 0, "precision": None, "recall": 0.0}
    assert scores["auc"] == pytest.approx(0.75)  # -z: noisy 2.5, 1.2 vs clean -0.1, 2.2
    empty = noise_filter.decision_arrays(_decisions()[:1], {1, 3})
    assert noise_filter.filter_scores(empty) == {"decisions": 0}


def test_over_training_scores_each_span_of_micro_batches():
    arrays = noise_filter.decision_arrays(_decisions(), {1, 3})
    rows = noise_filter.over_training(arrays, batches=3, chunks=3)
    assert [r["progress"] for r in rows] == pytest.approx([2 / 3, 1.0])  # span 1: warm-up only
    assert rows[0] == {
        "progress": rows[0]["progress"],
        "auc": 1.0,
        "dropped": 1,
        "precision": 1.0,
        "recall": 1.0,
    }
    assert rows[1]["auc"] == 0.0 and rows[1]["precision"] == 0.0 and rows[1]["recall"] == 0.0
