"""`cots ablate`: the COTS ablation ladder on one gallery with one budget, as a table and a chart.

Rungs: `clip` (in-batch InfoNCE baseline), `instance` (momentum contrast with queues), then
each COTS addition alone on top of `instance` (`+mvlm`, `+kl`, `+amf`) and all of them
(`cots`). Every rung runs the same base recipe with the same overrides (steps, batch, data);
only the `objectives` switches differ. A finished rung leaves `result.json` and is skipped
when the ladder is run again; a killed rung resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
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
    parser.set_defaults(func=_ablate)


def _ablate(args: argparse.Namespace) -> int:
    rungs = [r.strip() for r in args.rungs.split(",") if r.strip()]
    unknown = [r for r in rungs if r not in LADDER]
    if unknown:
        raise ValueError(f"unknown rung(s) {', '.join(unknown)} (known: {', '.join(LADDER)})")
    data = args.data
    out = args.out or paths.run_dir("ablation")
    results = run_ladder(
        data, out, rungs, args.base, args.sets, args.tokenizer, args.tokenizer_steps, args.split
    )
    print(markdown_table(results))
    print(f"table: {out / 'ablation.md'}  chart: {out / 'ablation.png'}")
    return 0


def run_ladder(
    data: str | Path,
    out: str | Path,
    rungs: list[str],
    base: str = "cots",
    overrides: list[str] | tuple[str, ...] = (),
    tokenizer: Path | None = None,
    tokenizer_steps: int = 1000,
    split: str = "test",
) -> list[dict[str, Any]]:
    """Train and score each rung (skipping finished ones), then write the table and chart."""
    out = Path(out)
    if any(MVLM in LADDER[r] for r in rungs) and tokenizer is None:
        tokenizer = _ensure_tokenizer(data, out / "tokenizer", base, overrides, tokenizer_steps)
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
    from training.tokenizer_training import TokenizerTraining, run_tokenizer_training
    from training.visual_tokenizer import WEIGHTS, TokenizerConfig

    if (out / WEIGHTS).is_file():
        return out
    model = model_config(load_config(base, list(overrides)))
    stride = 32 if model.image_tower == "efficientnet_lite0" else model.vit_patch_size
    settings = TokenizerTraining(steps=steps, warmup=min(100, max(1, steps // 10)))
    run_tokenizer_training(data, out, TokenizerConfig(stride=stride), model.image_spec(), settings)
    return out


def _dirname(rung: str) -> str:
    return rung.replace("+", "plus-")


def markdown_table(results: list[dict[str, Any]]) -> str:
    head = "| rung | " + " | ".join(COLUMNS) + " | pairs/s | AMF filtered |"
    rule = "|" + "---|" * (len(COLUMNS) + 3)
    rows = []
    for r in results:
        cells = [f"{r[c]:.1f}" for c in COLUMNS]
        rate = f"{r['pairs_per_s']:.1f}" if "pairs_per_s" in r else "-"
        filtered = f"{100 * r['amf_filtered']:.1f}%" if "amf_filtered" in r else "-"
        rows.append(f"| {r['rung']} | " + " | ".join(cells) + f" | {rate} | {filtered} |")
    return "\n".join([head, rule, *rows]) + "\n"


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
        left.bar(
            x + (i - len(recalls) / 2 + 0.5) * width, [r[key] for r in results], width, label=key
        )
    left.set(xticks=x, xticklabels=[r["rung"] for r in results], ylabel="recall (%)")
    left.set_title(f"recall@K on the {results[0]['split'] if results else ''} split")
    left.legend(ncols=2, fontsize=8)
    right.bar(x, [r["rsum"] for r in results], color="tab:gray")
    right.set(xticks=x, xticklabels=[r["rung"] for r in results], title="RSUM")
    right.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=100)
    plt.close(fig)
