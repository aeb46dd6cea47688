"""Noisy-pair test of the adaptive momentum filter (AMF).

    python -m bench.noise_filter --data cots-data/datasets/openclipart --lam 2 --lam 1 --lam 0.5
    python -m bench.noise_filter --data DIR --set model.preset=tiny --steps 50   # smoke

Corrupts a known fraction (default 20%) of the training pairs by shuffling captions among
them (every corrupted image gets another corrupted image's captions; val/test untouched),
then trains the same recipe (default `cots-cpu`) with the same budget without AMF and with
AMF at each threshold lam. Reports the filter's precision and recall at catching the
corrupted pairs (every decision after its warm-up, the last quarter of training, ten spans
of training, and what other thresholds would have dropped), and test recall of every run.
Writes noise_filter.json, noise_filter.png and decisions.npz; finished runs are reused.
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

from index_builder.manifest import image_path, load_records, write_manifest  # noqa: E402
from training.pipelines.ablate import switches  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="clean dataset directory")
    parser.add_argument("--out", type=Path, default=Path("cots-data/runs/noise-filter"))
    parser.add_argument("--noise", type=float, default=0.2, help="fraction of pairs corrupted")
    parser.add_argument("--steps", type=int, default=740, help="optimiser steps per run")
    parser.add_argument("--base", default="cots-cpu", help="base recipe or run file of both runs")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], help="override for both runs"
    )
    parser.add_argument("--seed", type=int, default=0, help="which pairs are corrupted")
    parser.add_argument(
        "--lam",
        dest="lams",
        type=float,
        action="append",
        help="AMF threshold lam (repeatable: one AMF run each; default 2, the method's); the "
        "histogram and decisions.npz are of the first",
    )
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


def train(data: Path, out: Path, base: str, overrides: list[str]) -> dict:
    """Train one run and score it on the test split; with AMF, also its recorded decisions.
    A finished run (its `bench.pt`) is loaded instead of trained again."""
    from index_builder.atomic import atomic_open
    from training.checkpoint import load_model
    from training.config import load_config
    from training.evaluate import SplitEvaluator
    from training.run import prepare

    done = out / "bench.pt"
    if done.is_file():
        return torch.load(done)
    cfg = load_config(base, overrides)
    cfg.name = out.name
    trainer = prepare(cfg, data, out)
    units = trainer.objectives.units
    amf = units["amf"] if "amf" in units else None  # noqa: SIM401 (ModuleDict has no get)
    if amf is not None:
        amf.recorder = []
    trainer.fit()
    model, _ = load_model(out / "checkpoints" / "best", trainer.device)
    result = {"metrics": SplitEvaluator(data, "test").evaluate(model, trainer.device)}
    if amf is not None:
        result.update(decisions=amf.recorder, lam=amf.filter.lam)
    with atomic_open(done, "wb", encoding=None) as handle:
        torch.save(result, handle)
    return result


LAMBDAS = (0.5, 1.0, 1.5, 2.0, 3.0)


def decision_arrays(decisions: list, noisy: set[int]) -> dict[str, np.ndarray]:
    """The filter's active decisions (after its warm-up) as flat arrays: micro-batch number,
    training-pair index, dropped, z score, and whether the pair was corrupted."""
    active = [(n, i, k, z) for n, (i, k, z) in enumerate(decisions) if z is not None]
    if not active:
        return {k: np.zeros(0) for k in ("batch", "index", "dropped", "z", "noisy")}
    index = torch.cat([i for _, i, _, _ in active]).numpy()
    return {
        "batch": np.concatenate([np.full(len(i), n) for n, i, _, _ in active]),
        "index": index,
        "dropped": torch.cat([k for _, _, k, _ in active]).numpy() == 0,
        "z": torch.cat([z for _, _, _, z in active]).numpy(),
        "noisy": np.isin(index, list(noisy)),
    }


def select(arrays: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in arrays.items()}


def filter_scores(a: dict[str, np.ndarray]) -> dict:
    """Precision/recall of 'dropped' at finding corrupted pairs, the same for other
    thresholds lam (drop when z < -lam), and the AUC of -z."""
    if not len(a["z"]):
        return {"decisions": 0}
    return {
        "decisions": len(a["z"]),
        "noisy_share": float(a["noisy"].mean()),
        **_precision_recall(a["dropped"], a["noisy"]),
        "auc": _auc(-a["z"], a["noisy"]),
        "by_lambda": {str(lam): _precision_recall(a["z"] < -lam, a["noisy"]) for lam in LAMBDAS},
    }


def over_training(a: dict[str, np.ndarray], batches: int, chunks: int = 10) -> list[dict]:
    """AUC and the filter's precision/recall in `chunks` equal spans of training."""
    rows = []
    for part in range(chunks):
        lo, hi = part * batches / chunks, (part + 1) * batches / chunks
        span = select(a, (a["batch"] >= lo) & (a["batch"] < hi))
        if len(span["z"]):
            rows.append(
                {
                    "progress": (part + 1) / chunks,
                    "auc": _auc(-span["z"], span["noisy"]),
                    **_precision_recall(span["dropped"], span["noisy"]),
                }
            )
    return rows


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


def plot(last: dict[str, np.ndarray], curve: list[dict], lam: float, path: Path) -> None:
    """Left: the last quarter's z scores, clean vs corrupted, with the threshold. Right: AUC
    and the filter's recall and precision over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not len(last["z"]):
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    z, noisy = last["z"], last["noisy"]
    bins = np.linspace(z.min(), z.max(), 60)
    left.hist(z[~noisy], bins, alpha=0.6, label="clean pairs")
    left.hist(z[noisy], bins, alpha=0.6, label="corrupted pairs")
    left.axvline(-lam, color="k", linestyle="--", label=f"AMF threshold (mean - {lam} std)")
    left.set(xlabel="momentum similarity, FIFO std from the FIFO mean", ylabel="pairs")
    left.set_title("AMF scores over the last quarter of training")
    left.legend()
    x = [r["progress"] for r in curve]
    right.plot(x, [r["auc"] for r in curve], "o-", label="AUC (corrupted below clean)")
    right.plot(x, [r["recall"] for r in curve], "s-", label="filter recall")
    right.plot(x, [r["precision"] for r in curve], "^-", label="filter precision")
    right.set(xlabel="fraction of training", ylim=(0, 1), title="catching corrupted pairs")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    args = parse_args()
    noisy_data = args.out / "dataset"
    noisy = corrupt(args.data, noisy_data, args.noise, args.seed)
    common = [*args.sets, f"train.max_steps={args.steps}"]
    without = train(
        noisy_data, args.out / "without-amf", args.base, [*common, *switches("instance")]
    )
    result = {
        "noise": args.noise,
        "corrupted_pairs": len(noisy),
        "steps": args.steps,
        "overrides": common,
        "test_without_amf": test_row(without),
        "with_amf": [],
    }
    for i, lam in enumerate(args.lams or [2.0]):
        amf = [*switches("instance", "amf"), f"objectives.amf.lam={lam}"]
        name = "with-amf" if i == 0 else f"with-amf-lam{lam:g}"
        run = train(noisy_data, args.out / name, args.base, [*common, *amf])
        batches = len(run["decisions"])
        arrays = decision_arrays(run["decisions"], noisy)
        last = select(arrays, arrays["batch"] >= batches * 3 // 4)
        row = {
            "lam": lam,
            "filter_all": filter_scores(arrays),
            "filter_last_quarter": filter_scores(last),
            "filter_over_training": over_training(arrays, batches),
            "test": test_row(run),
        }
        row["rsum_gain"] = row["test"]["rsum"] - result["test_without_amf"]["rsum"]
        result["with_amf"].append(row)
        if i == 0:  # the figures of the first (default: the method's) threshold
            np.savez(args.out / "decisions.npz", **arrays)
            plot(last, row["filter_over_training"], lam, args.out / "noise_filter.png")
    result["command"] = shlex.join(["python", "-m", "bench.noise_filter", *sys.argv[1:]])
    (args.out / "noise_filter.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def test_row(run: dict) -> dict[str, float]:
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    return {k: float(run["metrics"][k]) for k in keys}


if __name__ == "__main__":
    sys.exit(main())
