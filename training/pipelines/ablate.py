"""`cots ablate`: the COTS ablation ladder on one gallery with one budget, as a table and a chart.

Rungs: `clip` (in-batch InfoNCE baseline), `instance` (momentum contrast with queues), then
each COTS addition alone on top of `instance` (`+mvlm`, `+kl`, `+amf`) and all of them
(`cots`). Every rung runs the same base recipe with the same overrides (steps, batch, data);
only the `objectives` switches differ. A finished rung leaves `result.json` and is skipped
when the ladder is run again; a killed rung resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

from index_builder import paths
from index_builder.atomic import atomic_write_json, atomic_write_text
from training.config import add_data_argument, add_override_argument

log = logging.getLogger(__name__)

UNIT_NAMES = ("clip", "instance", "mvlm", "kl", "amf")


def switches(*enabled: str) -> list[str]:
    """Overrides that switch exactly `enabled` on and every other unit off."""
    return [f"objectives.{name}.enabled={str(name in enabled).lower()}" for name in UNIT_NAMES]


LADDER: dict[str, list[str]] = {
    "clip": switches("clip"),
    "instance": switches("instance"),
    "+mvlm": switches("instance", "mvlm"),
    "+kl": switches("instance", "kl"),
    "+amf": switches("instance", "amf"),
    "cots": switches("instance", "mvlm", "kl", "amf"),
}
MVLM = "objectives.mvlm.enabled=true"
COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "ablate",
        help="train the COTS ablation ladder (clip, instance, +mvlm, +kl, +amf, cots) and "
        "tabulate test recall",
        description="Runs every rung with the same base recipe and overrides, evaluates each "
        "best checkpoint on the test split, writes ablation.md, ablation.json, ablation.png.",
    )
    add_data_argument(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="ladder directory (default: $COTS_HOME/runs/ablation)",
    )
    parser.add_argument("--base", default="cots", help="base recipe or run file for every rung")
    parser.add_argument(
        "--rungs", default=",".join(LADDER), help=f"comma-separated subset of {', '.join(LADDER)}"
    )
    add_override_argument(
        parser, "a config override for every rung (repeatable), e.g. --set train.max_steps=300"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="visual tokenizer for the MVLM rungs (default: train one into OUT/tokenizer)",
    )
    parser.add_argument(
        "--tokenizer-steps", type=int, default=1000, help="steps when the tokenizer is trained here"
    )
    parser.add_argument("--split", default="test", help="split the table is measured on")
    parser.add_argument(
        "--seeds",
        default="",
        help="comma-separated training seeds: the ladder runs once per seed (in OUT/seed-N) and "
        "the table gives each cell's mean and standard deviation (default: one run, the "
        "config's train.seed)",
    )
    parser.set_defaults(func=_ablate)


def _ablate(args: argparse.Namespace) -> int:
    rungs = [r.strip() for r in args.rungs.split(",") if r.strip()]
    unknown = [r for r in rungs if r not in LADDER]
    if unknown:
        raise ValueError(f"unknown rung(s) {', '.join(unknown)} (known: {', '.join(LADDER)})")
    seeds = _parse_seeds(args.seeds)
    out = Path(args.out or paths.run_dir("ablation"))
    tokenizer = args.tokenizer
    if tokenizer is None and any(MVLM in LADDER[r] for r in rungs):  # one for every seed
        tokenizer = _ensure_tokenizer(
            args.data, out / "tokenizer", args.base, args.sets, args.tokenizer_steps
        )
    run = functools.partial(
        run_ladder, args.data, rungs=rungs, base=args.base, tokenizer=tokenizer, split=args.split
    )
    if seeds:
        per_seed = [
            run(out / f"seed-{s}", overrides=[*args.sets, f"train.seed={s}"]) for s in seeds
        ]
        results = summarize(per_seed, seeds)
        write_report(results, out)
    else:
        results = run(out, overrides=args.sets)
    print(markdown_table(results))
    print(f"table: {out / 'ablation.md'}  chart: {out / 'ablation.png'}")
    return 0


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {text!r}")
    return seeds


def summarize(per_seed: list[list[dict[str, Any]]], seeds: list[int]) -> list[dict[str, Any]]:
    """One row per rung: each column's mean over the seeds, its standard deviation
    (`<column>_std`, sample, 0 for one seed), the RSUM of every seed and, when the ladder has
    an `instance` rung, every seed's RSUM minus that seed's `instance` RSUM (a paired
    difference: the seeds move all rungs together, so it is steadier than the means)."""
    import numpy as np

    rows = []
    for runs in zip(*per_seed, strict=True):
        row: dict[str, Any] = {"rung": runs[0]["rung"], "split": runs[0]["split"], "seeds": seeds}
        for key in (*COLUMNS, "pairs_per_s", "amf_filtered", "steps", "train_seconds"):
            values = [r[key] for r in runs if key in r]
            if len(values) == len(runs):
                row[key] = float(np.mean(values))
                if key in COLUMNS:
                    row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        row["rsum_per_seed"] = [r["rsum"] for r in runs]
        rows.append(row)
    base = next((r["rsum_per_seed"] for r in rows if r["rung"] == "instance"), None)
    for row in rows if base else []:
        row["rsum_vs_instance"] = [a - b for a, b in zip(row["rsum_per_seed"], base, strict=True)]
    return rows


def run_ladder(
    data: str | Path,
    out: str | Path,
    rungs: list[str],
    base: str = "cots",
    overrides: list[str] | tuple[str, ...] = (),
    tokenizer: Path | None = None,
    split: str = "test",
) -> list[dict[str, Any]]:
    """Train and score each rung (skipping finished ones), then write the table and chart.
    The MVLM rungs need `tokenizer`."""
    out = Path(out)
    if tokenizer is None and any(MVLM in LADDER[r] for r in rungs):
        raise ValueError("the MVLM rungs need a visual tokenizer")
    results = []
    for rung in rungs:
        extra = [f"objectives.mvlm.tokenizer={tokenizer}"] if MVLM in LADDER[rung] else []
        results.append(
            run_rung(data, out / _dirname(rung), rung, base, [*overrides, *extra], split)
        )
    write_report(results, out)
    return results


def run_rung(
    data: str | Path, out: Path, rung: str, base: str, overrides: list[str], split: str
) -> dict[str, Any]:
    """One rung: train (or resume), score the best checkpoint on `split`, write result.json."""
    from training.checkpoint import load_model
    from training.config import load_config
    from training.evaluate import SplitEvaluator
    from training.run import LAST, prepare

    done = out / "result.json"
    if done.is_file():
        log.info("%s: already done (%s)", rung, done)
        return json.loads(done.read_text(encoding="utf-8"))
    cfg = load_config(base, [*overrides, *LADDER[rung]])
    cfg.name = f"ablation-{_dirname(rung)}"
    trainer = prepare(cfg, data, out, resume=(out / LAST).exists())
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    model, _ = load_model(out / "checkpoints" / "best", trainer.device)
    metrics = SplitEvaluator(data, split).evaluate(model, trainer.device)
    result = {
        "rung": rung,
        "overrides": [*overrides, *LADDER[rung]],
        "split": split,
        "steps": trainer.step,
        "train_seconds": round(seconds, 1),
        **_train_summary(out / "metrics.jsonl"),
        **{k: float(v) for k, v in metrics.items()},
    }
    atomic_write_json(done, result)
    return result


def _train_summary(metrics_path: Path) -> dict[str, float]:
    """Median training throughput and, with AMF, the fraction of pairs it filtered."""
    from statistics import median

    from training.plots import read_metrics

    train = [r for r in read_metrics(metrics_path) if r.get("kind") == "train"]
    summary: dict[str, float] = {}
    rates = [r["pairs_per_s"] for r in train if "pairs_per_s" in r]
    if rates:
        summary["pairs_per_s"] = round(median(rates), 2)
    filtered = [r["amf_filtered_total"] for r in train if "amf_filtered_total" in r]
    if filtered:
        summary["amf_filtered"] = round(filtered[-1], 4)
    return summary


def _ensure_tokenizer(
    data: str | Path, out: Path, base: str, overrides: list[str] | tuple[str, ...], steps: int
) -> Path:
    """Train the visual tokenizer for the ladder's preset once (kept in OUT/tokenizer)."""
    from training.config import load_config
    from training.run import model_config
    from training.visual_tokenizer.model import WEIGHTS, TokenizerConfig
    from training.visual_tokenizer.training import TokenizerTraining, run_tokenizer_training

    if (out / WEIGHTS).is_file():
        return out
    model = model_config(load_config(base, list(overrides)))
    settings = TokenizerTraining(steps=steps, warmup=min(100, max(1, steps // 10)))
    run_tokenizer_training(
        data, out, TokenizerConfig(stride=model.image_stride), model.image_spec(), settings
    )
    return out


def _dirname(rung: str) -> str:
    return rung.replace("+", "plus-")


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per rung; over several seeds each cell is `mean ± std` and the RSUM of every
    seed follows."""
    seeds = bool(results) and "rsum_per_seed" in results[0]
    extra = " RSUM per seed (minus instance) |" if seeds else ""
    head = "| rung | " + " | ".join(COLUMNS) + " | pairs/s | AMF filtered |" + extra
    rule = "|" + "---|" * (len(COLUMNS) + 3 + bool(seeds))
    rows = []
    for r in results:
        cells = [_cell(r, c) for c in COLUMNS]
        rate = f"{r['pairs_per_s']:.1f}" if "pairs_per_s" in r else "-"
        filtered = f"{100 * r['amf_filtered']:.1f}%" if "amf_filtered" in r else "-"
        row = f"| {r['rung']} | " + " | ".join(cells) + f" | {rate} | {filtered} |"
        if seeds:
            row += " " + " / ".join(f"{v:.1f}" for v in r["rsum_per_seed"])
            if "rsum_vs_instance" in r:
                row += " (" + " / ".join(f"{v:+.1f}" for v in r["rsum_vs_instance"]) + ")"
            row += " |"
        rows.append(row)
    return "\n".join([head, rule, *rows]) + "\n"


def _cell(row: dict[str, Any], column: str) -> str:
    std = row.get(f"{column}_std")
    return f"{row[column]:.1f}" if std is None else f"{row[column]:.1f} ± {std:.1f}"


def write_report(results: list[dict[str, Any]], out: Path) -> None:
    """ablation.json (all numbers), ablation.md (the table) and ablation.png (bar chart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ablation.json", results)
    atomic_write_text(out / "ablation.md", markdown_table(results))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=(3, 1))
    x = np.arange(len(results))
    recalls = COLUMNS[:-1]
    width = 0.8 / len(recalls)
    for i, key in enumerate(recalls):
        offset = x + (i - len(recalls) / 2 + 0.5) * width
        left.bar(offset, [r[key] for r in results], width, yerr=_std(results, key), label=key)
    left.set(xticks=x, xticklabels=[r["rung"] for r in results], ylabel="recall (%)")
    seeds = f", mean ± std over {len(results[0]['seeds'])} seeds" if "seeds" in results[0] else ""
    left.set_title(f"recall@K on the {results[0]['split']} split{seeds}")
    left.legend(ncols=6, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    right.bar(x, [r["rsum"] for r in results], yerr=_std(results, "rsum"), color="tab:gray")
    right.set(xticks=x, xticklabels=[r["rung"] for r in results], title="RSUM")
    right.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=100)
    plt.close(fig)


def _std(results: list[dict[str, Any]], key: str) -> list[float] | None:
    return [r[f"{key}_std"] for r in results] if f"{key}_std" in results[0] else None
