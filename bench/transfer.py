"""Transfer: checkpoints trained on one gallery, scored zero-shot on galleries they never saw.

    python -m bench.transfer \
        --run clip-cpu:0=RUNS/ladder-cookie/seed-0/clip --run cots-cpu:0=RUNS/cots-cpu-s0 ... \
        --eval openclipart:test=DATA/openclipart --eval emoji:all=DATA/emoji \
        --eval synthetic:all=DATA/synthetic --out bench/results/transfer.json

Each `--run RECIPE:SEED=RUN_DIR` names a finished run (its checkpoints/best is scored); each
`--eval NAME:SPLIT=DATASET` a gallery and split (`all` for a gallery never trained on). Every
checkpoint is scored on every gallery as `cots eval` does: recall@1/5/10 both ways and RSUM,
image-to-image (same category relevant) and text-to-text (captions of the same image) mAP
and R@K; frozen-tower checkpoints read their tower outputs from the feature cache. With
`--pretrained RECIPE` the unimodal metrics of that recipe's frozen pretrained towers (their
pooled outputs, no projection) are added as a reference row. Writes all metrics and a
mean ± std summary per recipe and gallery, and prints the table.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.figure import Figure
from bench.tables import fmt, table
from index_builder.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]

SUMMARY = ("rsum", "i2t_r1", "t2i_r1", "i2i_map", "i2i_r1", "t2t_map", "t2t_r1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", dest="runs", action="append", required=True, help="RECIPE:SEED=RUN_DIR"
    )
    parser.add_argument(
        "--eval", dest="evals", action="append", required=True, help="NAME:SPLIT=DATASET_DIR"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/transfer.json"))
    parser.add_argument("--feature-cache", type=Path, default=None, help="feature cache root")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="a recipe whose pretrained towers' own unimodal retrieval is the reference row",
    )
    return parser.parse_args(argv)


def _split_spec(text: str, what: str) -> tuple[str, str, str]:
    head, sep, path = text.partition("=")
    name, colon, tail = head.partition(":")
    if not (sep and colon and name and tail and path):
        raise SystemExit(f"{what} {text!r} must look like NAME:X=PATH")
    return name, tail, path


def score(checkpoint: Path, dataset: str, split: str, cache: Path | None) -> dict[str, Any]:
    from training.checkpoint import load_model
    from training.evaluate import score_split
    from training.feature_cache import FeatureStore, default_root

    model, meta = load_model(checkpoint)
    config = model.config
    frozen = config.image_trainable_blocks == 0 and config.text_trainable_blocks == 0
    store = FeatureStore(cache or default_root()) if frozen else None
    # token sequences cached for every recipe: one entry per gallery serves them all
    metrics = score_split(model, dataset, split, store=store, cache_tokens=True)
    return {**metrics, "step": meta.get("step")}


def score_pretrained(recipe: str, dataset: str, split: str, cache: Path | None) -> dict:
    """Unimodal metrics of the recipe's pretrained towers: pooled outputs, L2-normalised."""
    import torch.nn.functional as F

    from training.categories import record_category
    from training.config import load_config
    from training.evaluate import split_records, unimodal_metrics
    from training.feature_cache import FeatureStore, default_root
    from training.model import build_model
    from training.run import model_config

    model = build_model(model_config(load_config(recipe)))
    feats = FeatureStore(cache or default_root()).load(model, dataset, split, tokens=True)
    image, text = F.normalize(feats.image_pooled, dim=-1), F.normalize(feats.text_pooled, dim=-1)
    categories = [record_category(r) for r in split_records(dataset, split)]
    return unimodal_metrics(image, text, feats.owner, categories)


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of each SUMMARY metric, per (recipe, gallery)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["recipe"], record["gallery"])].append(record)
    rows = []
    for (recipe, gallery), runs in groups.items():
        row: dict[str, Any] = {"recipe": recipe, "gallery": gallery}
        row["seeds"] = [r["seed"] for r in runs]
        for key in SUMMARY:
            values = [r["metrics"][key] for r in runs if key in r["metrics"]]
            if len(values) == len(runs):
                row[key] = float(np.mean(values))
                row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| gallery | recipe | " + " | ".join(SUMMARY) + " |"
    lines = [head, "|" + "---|" * (len(SUMMARY) + 2)]
    for row in sorted(rows, key=lambda r: (r["gallery"], r["recipe"])):
        cells = [_cell(row, k) for k in SUMMARY]
        lines.append(f"| {row['gallery']} | {row['recipe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return "-"
    return (
        f"{row[key]:.1f}" if len(row["seeds"]) < 2 else f"{row[key]:.1f} ± {row[f'{key}_std']:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = [_split_spec(text, "--run") for text in args.runs]
    evals = [_split_spec(text, "--eval") for text in args.evals]
    records = []
    for recipe, seed, run_dir in runs:
        checkpoint = Path(run_dir) / "checkpoints" / "best"
        for gallery, split, dataset in evals:
            start = time.perf_counter()
            metrics = score(checkpoint, dataset, split, args.feature_cache)
            records.append(
                {
                    "recipe": recipe,
                    "seed": int(seed),
                    "run": str(run_dir),
                    "gallery": gallery,
                    "split": split,
                    "dataset": str(dataset),
                    "seconds": round(time.perf_counter() - start, 1),
                    "metrics": metrics,
                }
            )
            print(f"{recipe} seed {seed} on {gallery}:{split}: RSUM {metrics['rsum']:.1f}")
    for gallery, split, dataset in evals if args.pretrained else []:
        metrics = score_pretrained(args.pretrained, dataset, split, args.feature_cache)
        recipe = f"pretrained towers ({args.pretrained})"
        records.append(
            {"recipe": recipe, "seed": 0, "gallery": gallery, "split": split, "metrics": metrics}
        )
    rows = summarize(records)
    command = "python -m bench.transfer " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    atomic_write_json(args.out, {"command": command, "summary": rows, "runs": records})
    print(markdown(rows))
    return 0


def _mean(row: dict[str, Any], key: str) -> str:
    """A summary cell: the mean, ± the standard deviation over two or more seeds."""
    if row.get(key) is None:
        return ""
    spread = f" ± {row[key + '_std']:.1f}" if len(row.get("seeds", [])) > 1 else ""
    return f"{row[key]:.1f}{spread}"


def _pair(a: str, b: str) -> str:
    return f"{a} / {b}" if a or b else ""


def _recalls(metrics: dict[str, Any], way: str) -> str:
    values = [metrics.get(f"{way}_r{k}") for k in (1, 5, 10)]
    return "" if None in values else " / ".join(f"{v:.1f}" for v in values)


def transfer_tables(data: dict) -> str:
    """transfer*.json: per recipe (rows) and gallery (columns), cross-modal RSUM, R@1 both ways
    and the within-modality scores; then one line per run and gallery."""
    summary, runs = data.get("summary") or [], data.get("runs") or []
    galleries = list(dict.fromkeys(row["gallery"] for row in summary))
    recipes = list(dict.fromkeys(row["recipe"] for row in summary))
    cell = {(row["recipe"], row["gallery"]): row for row in summary}

    def grid(show: Callable[[dict[str, Any]], str]) -> str:
        rows = [
            {"recipe": recipe, **{g: show(cell.get((recipe, g), {})) for g in galleries}}
            for recipe in recipes
        ]
        return table(rows, ["recipe", *galleries])

    seeds = ", ".join(sorted({str(s) for row in summary for s in row.get("seeds", [])}))
    parts = [
        f"Mean over seeds {seeds} (± their standard deviation). An empty cell: the gallery has "
        "no such queries (synthetic has no categories for image-to-image), or the towers were "
        "never aligned across modalities (pretrained, untrained projections).",
        "**Cross-modal RSUM** (R@1+5+10, both ways)\n\n" + grid(lambda r: _mean(r, "rsum")),
        "**R@1, image-to-text / text-to-image**\n\n"
        + grid(lambda r: _pair(_mean(r, "i2t_r1"), _mean(r, "t2i_r1"))),
        "**Within one modality: image-to-image mAP / text-to-text R@1**\n\n"
        + grid(lambda r: _pair(_mean(r, "i2i_map"), _mean(r, "t2t_r1"))),
    ]
    per_run = []
    for run in runs:
        m = run.get("metrics", {})
        per_run.append(
            {
                "recipe": run.get("recipe"),
                "seed": run.get("seed"),
                "gallery": f"{run.get('gallery')} ({run.get('split')})",
                "images / captions": _pair(fmt(m.get("images")), fmt(m.get("captions"))),
                "RSUM": None if m.get("rsum") is None else round(m["rsum"], 1),
                "i2t R@1/5/10": _recalls(m, "i2t"),
                "t2i R@1/5/10": _recalls(m, "t2i"),
                "i2i mAP": None if m.get("i2i_map") is None else round(m["i2i_map"], 1),
                "t2t R@1": None if m.get("t2t_r1") is None else round(m["t2t_r1"], 1),
                "run": run.get("run"),
            }
        )
    if per_run:
        parts.append("**Each run**\n\n" + table(per_run))
    return "\n\n".join(parts)


FIGURE = Figure(
    "Transfer to galleries never trained on",
    "transfer*.json",
    "python -m bench.transfer --run RECIPE:SEED=RUN ... --eval NAME:SPLIT=DATASET ... "
    "--out bench/results/transfer_cpu.json",
    render=transfer_tables,
)


if __name__ == "__main__":
    raise SystemExit(main())
