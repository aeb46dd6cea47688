"""Noisy-pair test of the adaptive momentum filter (AMF).

    python bench/noise_filter.py --data cots-data/datasets/openclipart --steps 600
    python bench/noise_filter.py --data DIR --set model.preset=tiny --steps 50   # smoke

Corrupts a known fraction (default 20%) of the training pairs by shuffling captions among
them (every corrupted image gets another corrupted image's captions; val/test untouched),
then trains the same recipe twice with the same budget, without and with AMF. Reports
the filter's precision and recall at catching the corrupted pairs (every decision made
after its warm-up, and over the last quarter of training), and test recall of both runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from index_builder.manifest import image_path, load_records, write_manifest  # noqa: E402
from training.ablate import switches  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="clean dataset directory")
    parser.add_argument("--out", type=Path, default=Path("cots-data/runs/noise-filter"))
    parser.add_argument("--noise", type=float, default=0.2, help="fraction of pairs corrupted")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per run")
    parser.add_argument("--base", default="cots-cpu", help="base recipe or run file of both runs")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], help="override for both runs"
    )
    parser.add_argument("--seed", type=int, default=0, help="which pairs are corrupted")
    return parser.parse_args()


def corrupt(data: Path, out: Path, fraction: float, seed: int) -> set[int]:
    """Write a copy of `data` (images referenced in place) whose training pairs at the
    returned indices (positions in the train split) carry another corrupted pair's captions."""
    records = [
        dataclasses.replace(r, image=str(image_path(data, r).resolve())) for r in load_records(data)
    ]
    train = [i for i, r in enumerate(records) if r.split == "train"]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(train), size=round(fraction * len(train)), replace=False)
    donors = chosen[np.roll(rng.permutation(len(chosen)), 1)]  # a cycle: nobody keeps its own
    new = list(records)
    for dst, src in zip(chosen, donors, strict=True):
        new[train[dst]] = dataclasses.replace(
            records[train[dst]], captions=records[train[src]].captions
        )
    write_manifest(out, new, {"name": f"noisy-{fraction}", "source": str(data)})
    return {int(i) for i in chosen}


def train(data: Path, out: Path, base: str, overrides: list[str], record: bool) -> dict:
    from training.checkpoint import load_model
    from training.config import load_config
    from training.evaluate import SplitEvaluator
    from training.run import prepare

    cfg = load_config(base, overrides)
    cfg.name = out.name
    trainer = prepare(cfg, data, out)
    units = trainer.objectives.units
    amf = units["amf"] if "amf" in units else None  # noqa: SIM401 (ModuleDict has no get)
    if record and amf is not None:
        amf.recorder = []
    trainer.fit()
    model, _ = load_model(out / "checkpoints" / "best", trainer.device)
    metrics = SplitEvaluator(data, "test").evaluate(model, trainer.device)
    if amf is None:
        return {"metrics": metrics}
    return {"metrics": metrics, "decisions": amf.recorder, "lam": amf.filter.lam}


LAMBDAS = (0.5, 1.0, 1.5, 2.0, 3.0)


def filter_scores(decisions: list, noisy: set[int]) -> dict:
    """Precision/recall of 'dropped' at finding corrupted pairs over the filter's active
    decisions, the same for other thresholds lam (drop when z < -lam), and the AUC of -z."""
    active = [(i, k, z) for i, k, z in decisions if z is not None]
    if not active:
        return {"decisions": 0}
    index = torch.cat([i for i, _, _ in active])
    dropped = torch.cat([k for _, k, _ in active]) == 0
    z = torch.cat([z for _, _, z in active]).numpy()
    is_noisy = np.array([int(i) in noisy for i in index])
    return {
        "decisions": int(index.numel()),
        "noisy_share": float(is_noisy.mean()),
        **_precision_recall(dropped.numpy(), is_noisy),
        "auc": _auc(-z, is_noisy),
        "by_lambda": {str(lam): _precision_recall(z < -lam, is_noisy) for lam in LAMBDAS},
    }


def _precision_recall(dropped: np.ndarray, is_noisy: np.ndarray) -> dict:
    hit = int((dropped & is_noisy).sum())
    return {
        "dropped": int(dropped.sum()),
        "precision": hit / int(dropped.sum()) if dropped.any() else None,  # undefined
        "recall": hit / max(1, int(is_noisy.sum())),
    }


def _auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = score[positive], np.sort(score[~positive])
    if not len(pos) or not len(neg):
        return None
    below = np.searchsorted(neg, pos, "left") + np.searchsorted(neg, pos, "right")
    return float(below.sum() / 2 / (len(pos) * len(neg)))


def plot(decisions: list, noisy: set[int], lam: float, path: Path) -> None:
    """Histogram of the last quarter's z scores, clean vs corrupted pairs, with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    active = [(i, z) for i, _, z in decisions if z is not None]
    if not active:
        return
    index = torch.cat([i for i, _ in active]).numpy()
    z = torch.cat([z for _, z in active]).numpy()
    is_noisy = np.array([int(i) in noisy for i in index])
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(z.min(), z.max(), 60)
    ax.hist(z[~is_noisy], bins, alpha=0.6, label="clean pairs")
    ax.hist(z[is_noisy], bins, alpha=0.6, label="corrupted pairs")
    ax.axvline(-lam, color="k", linestyle="--", label=f"AMF threshold (mean - {lam} std)")
    ax.set(
        xlabel="momentum similarity, FIFO standard deviations from the FIFO mean", ylabel="pairs"
    )
    ax.set_title("AMF scores over the last quarter of training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    args = parse_args()
    noisy_data = args.out / "dataset"
    noisy = corrupt(args.data, noisy_data, args.noise, args.seed)
    common = [*args.sets, f"train.max_steps={args.steps}"]
    without = train(
        noisy_data, args.out / "without-amf", args.base, [*common, *switches("instance")], False
    )
    with_amf = train(
        noisy_data,
        args.out / "with-amf",
        args.base,
        [*common, *switches("instance", "amf")],
        True,
    )
    decisions = with_amf["decisions"]
    last = decisions[len(decisions) * 3 // 4 :]
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    result = {
        "noise": args.noise,
        "corrupted_pairs": len(noisy),
        "steps": args.steps,
        "overrides": common,
        "filter_all": filter_scores(decisions, noisy),
        "filter_last_quarter": filter_scores(last, noisy),
        "test_without_amf": {k: without["metrics"][k] for k in keys},
        "test_with_amf": {k: with_amf["metrics"][k] for k in keys},
    }
    result["rsum_gain"] = result["test_with_amf"]["rsum"] - result["test_without_amf"]["rsum"]
    result["command"] = shlex.join(["python", "bench/noise_filter.py", *sys.argv[1:]])
    plot(last, noisy, with_amf["lam"], args.out / "noise_filter.png")
    (args.out / "noise_filter.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
