"""`cots ablate`: an ablation ladder on one gallery with one budget, as a table and a chart.

`--ladder cots`: `clip` (in-batch InfoNCE baseline), `instance` (momentum contrast with
queues), then each COTS addition alone on top of `instance` (`+mvlm`, `+kl`, `+amf`) and all
of them (`cots`). `--ladder cookie`: `clip`, then COOKIE's parts added one at a time: the
weight-sharing transformer (`+shared`, trained by the image-text loss alone), the image
knowledge loss (`+image-knowledge`), the text knowledge loss (`+text-knowledge`, which is the
full `cookie` objective). Every rung runs the same base recipe with the same overrides
(steps, batch, data); only the `objectives` switches and pairs (and, for COOKIE's `clip`
rung, `model.options.shared_layers=0`) differ. A finished rung leaves `result.json` and is
skipped when the ladder is run again; a killed rung resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index_builder import paths
from index_builder.atomic import atomic_write_json, atomic_write_text
from training.config import add_data_argument, add_override_argument

log = logging.getLogger(__name__)

UNIT_NAMES = ("clip", "instance", "mvlm", "kl", "amf", "cookie")


def switches(*enabled: str) -> list[str]:
    """Overrides that switch exactly `enabled` on and every other unit off."""
    return [f"objectives.{name}.enabled={str(name in enabled).lower()}" for name in UNIT_NAMES]


def cookie_pairs(*pairs: str) -> list[str]:
    """COOKIE on, with exactly these `source-target` pairs (weight 1 each)."""
    listed = ",".join("[{},{},1]".format(*pair.split("-")) for pair in pairs)
    return [*switches("cookie"), f"objectives.cookie.pairs=[{listed}]"]


@dataclass(frozen=True)
class Ladder:
    rungs: dict[str, list[str]]  # rung -> the overrides that make it
    base: str  # default base recipe
    baseline: str  # the rung every seed's RSUM is compared with


LADDERS = {
    "cots": Ladder(
        {
            "clip": switches("clip"),
            "instance": switches("instance"),
            "+mvlm": switches("instance", "mvlm"),
            "+kl": switches("instance", "kl"),
            "+amf": switches("instance", "amf"),
            "cots": switches("instance", "mvlm", "kl", "amf"),
        },
        base="cots",
        baseline="instance",
    ),
    "cookie": Ladder(
        {
            "clip": [*switches("clip"), "model.options.shared_layers=0"],
            "+shared": cookie_pairs("image-text"),
            "+image-knowledge": cookie_pairs("image-text", "image-image_teacher"),
            "+text-knowledge": cookie_pairs(
                "image-text", "image-image_teacher", "text-text_teacher"
            ),
        },
        base="cookie-cpu",
        baseline="clip",
    ),
}
MVLM = "objectives.mvlm.enabled=true"
COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
UNIMODAL = ("i2i_map", "t2t_map")  # tabulated when the split's metrics have them


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "ablate",
        help="train an ablation ladder (COTS: clip, instance, +mvlm, +kl, +amf, cots; COOKIE: "
        "clip, +shared, +image-knowledge, +text-knowledge) and tabulate test retrieval",
        description="Runs every rung with the same base recipe and overrides, evaluates each "
        "best checkpoint on the test split (cross-modal recall, unimodal mAP), writes "
        "ablation.md, ablation.json, ablation.png.",
    )
    add_data_argument(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="ladder directory (default: $COTS_HOME/runs/ablation; "
        "$COTS_HOME/runs/ablation-cookie for --ladder cookie)",
    )
    parser.add_argument(
        "--ladder", choices=sorted(LADDERS), default="cots", help="which ladder (default cots)"
    )
    parser.add_argument(
        "--base",
        default=None,
        help="base recipe or run file for every rung (default: cots for the COTS ladder, "
        "cookie-cpu for the COOKIE one)",
    )
    parser.add_argument(
        "--rungs", default="", help="comma-separated subset of the ladder's rungs (default: all)"
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
    ladder = LADDERS[args.ladder]
    rungs = [r.strip() for r in args.rungs.split(",") if r.strip()] or list(ladder.rungs)
    unknown = [r for r in rungs if r not in ladder.rungs]
    if unknown:
        raise ValueError(f"unknown rung(s) {', '.join(unknown)} (known: {', '.join(ladder.rungs)})")
    seeds = _parse_seeds(args.seeds)
    default_out = "ablation" if args.ladder == "cots" else f"ablation-{args.ladder}"
    out = Path(args.out or paths.run_dir(default_out))
    base = args.base or ladder.base
    tokenizer = args.tokenizer
    if tokenizer is None and any(MVLM in ladder.rungs[r] for r in rungs):  # one for every seed
        tokenizer = _ensure_tokenizer(
            args.data, out / "tokenizer", base, args.sets, args.tokenizer_steps
        )
    run = functools.partial(
        run_ladder,
        args.data,
        rungs=rungs,
        base=base,
        tokenizer=tokenizer,
        split=args.split,
        ladder=args.ladder,
    )
    if seeds:
        per_seed = [
            run(out / f"seed-{s}", overrides=[*args.sets, f"train.seed={s}"]) for s in seeds
        ]
        results = summarize(per_seed, seeds, ladder.baseline)
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


def summarize(
    per_seed: list[list[dict[str, Any]]], seeds: list[int], baseline: str = "instance"
) -> list[dict[str, Any]]:
    """One row per rung: each column's mean over the seeds, its standard deviation
    (`<column>_std`, sample, 0 for one seed), the RSUM of every seed and, when the ladder has
    its `baseline` rung, every seed's RSUM minus that seed's baseline RSUM
    (`rsum_vs_<baseline>`: a paired difference; the seeds move all rungs together, so it is
    steadier than the means)."""
    import numpy as np

    rows = []
    for runs in zip(*per_seed, strict=True):
        row: dict[str, Any] = {"rung": runs[0]["rung"], "split": runs[0]["split"], "seeds": seeds}
        tabulated = (*COLUMNS, *UNIMODAL)
        for key in (*tabulated, "pairs_per_s", "amf_filtered", "steps", "train_seconds"):
            values = [r[key] for r in runs if key in r]
            if len(values) == len(runs):
                row[key] = float(np.mean(values))
                if key in tabulated:
                    row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        row["rsum_per_seed"] = [r["rsum"] for r in runs]
        rows.append(row)
    base = next((r["rsum_per_seed"] for r in rows if r["rung"] == baseline), None)
    for row in rows if base else []:
        row["baseline"] = baseline
        deltas = [a - b for a, b in zip(row["rsum_per_seed"], base, strict=True)]
        row[f"rsum_vs_{baseline}"] = deltas
    return rows


def run_ladder(
    data: str | Path,
    out: str | Path,
    rungs: list[str],
    base: str = "cots",
    overrides: list[str] | tuple[str, ...] = (),
    tokenizer: Path | None = None,
    split: str = "test",
    ladder: str = "cots",
) -> list[dict[str, Any]]:
    """Train and score each rung of `ladder` (skipping finished ones), then write the table
    and chart. The MVLM rungs need `tokenizer`."""
    out, steps = Path(out), LADDERS[ladder].rungs
    if tokenizer is None and any(MVLM in steps[r] for r in rungs):
        raise ValueError("the MVLM rungs need a visual tokenizer")
    results = []
    for rung in rungs:
        extra = [f"objectives.mvlm.tokenizer={tokenizer}"] if MVLM in steps[rung] else []
        rung_overrides = [*overrides, *extra, *steps[rung]]
        results.append(run_rung(data, out / _dirname(rung), rung, base, rung_overrides, split))
    write_report(results, out)
    return results


def run_rung(
    data: str | Path, out: Path, rung: str, base: str, overrides: list[str], split: str
) -> dict[str, Any]:
    """One rung: train (or resume) `base` with `overrides`, score the best checkpoint on
    `split` (cross-modal and unimodal; over the feature cache when the towers are frozen),
    write result.json."""
    from training.checkpoint import load_model
    from training.config import load_config
    from training.evaluate import score_split
    from training.run import LAST, feature_store, prepare

    done = out / "result.json"
    if done.is_file():
        log.info("%s: already done (%s)", rung, done)
        return json.loads(done.read_text(encoding="utf-8"))
    cfg = load_config(base, overrides)
    cfg.name = f"ablation-{_dirname(rung)}"
    trainer = prepare(cfg, data, out, resume=(out / LAST).exists())
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    model, _ = load_model(out / "checkpoints" / "best", trainer.device)
    store = feature_store(cfg.data.feature_store) if cfg.data.cache_frozen_features else None
    metrics = score_split(
        model, data, split, trainer.device, store=store, cache_tokens=cfg.data.cache_tokens
    )
    result = {
        "rung": rung,
        "overrides": overrides,
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
    seed follows (and its difference from the baseline rung's, seed by seed)."""
    seeds = bool(results) and "rsum_per_seed" in results[0]
    columns = _columns(results)
    baseline = results[0].get("baseline") if results else None
    extra = f" RSUM per seed (minus {baseline}) |" if baseline else " RSUM per seed |"
    head = "| rung | " + " | ".join(columns) + " | pairs/s | AMF filtered |"
    head += extra if seeds else ""
    rule = "|" + "---|" * (len(columns) + 3 + bool(seeds))
    rows = []
    for r in results:
        cells = [_cell(r, c) for c in columns]
        rate = f"{r['pairs_per_s']:.1f}" if "pairs_per_s" in r else "-"
        filtered = f"{100 * r['amf_filtered']:.1f}%" if "amf_filtered" in r else "-"
        row = f"| {r['rung']} | " + " | ".join(cells) + f" | {rate} | {filtered} |"
        if seeds:
            row += " " + " / ".join(f"{v:.1f}" for v in r["rsum_per_seed"])
            if f"rsum_vs_{baseline}" in r:
                row += " (" + " / ".join(f"{v:+.1f}" for v in r[f"rsum_vs_{baseline}"]) + ")"
            row += " |"
        rows.append(row)
    return "\n".join([head, rule, *rows]) + "\n"


def _columns(results: list[dict[str, Any]]) -> tuple[str, ...]:
    """The cross-modal columns, then the unimodal ones every row has."""
    unimodal = tuple(c for c in UNIMODAL if results and all(c in r for r in results))
    return (*COLUMNS, *unimodal)


def _cell(row: dict[str, Any], column: str) -> str:
    std = row.get(f"{column}_std")
    return f"{row[column]:.1f}" if std is None else f"{row[column]:.1f} ± {std:.1f}"


def write_report(results: list[dict[str, Any]], out: Path) -> None:
    """ablation.json (all numbers), ablation.md (the table) and ablation.png (bar charts:
    recall@K, RSUM and, when measured, unimodal mAP)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ablation.json", results)
    atomic_write_text(out / "ablation.md", markdown_table(results))
    unimodal = _columns(results)[len(COLUMNS) :]
    ratios = (3, 1, 1) if unimodal else (3, 1)
    fig, axes = plt.subplots(1, len(ratios), figsize=(4 * len(ratios) + 3, 4), width_ratios=ratios)
    x, names = np.arange(len(results)), [r["rung"] for r in results]
    _bars(axes[0], results, COLUMNS[:-1], x)
    axes[0].set(xticks=x, xticklabels=names, ylabel="recall (%)")
    seeds = f", mean ± std over {len(results[0]['seeds'])} seeds" if "seeds" in results[0] else ""
    axes[0].set_title(f"recall@K on the {results[0]['split']} split{seeds}")
    axes[0].legend(ncols=6, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    axes[1].bar(x, [r["rsum"] for r in results], yerr=_std(results, "rsum"), color="tab:gray")
    axes[1].set(xticks=x, xticklabels=names, title="RSUM")
    if unimodal:
        _bars(axes[2], results, unimodal, x)
        axes[2].set(xticks=x, xticklabels=names, title="unimodal mAP (%)")
        axes[2].legend(fontsize=8)
    for axis in axes[1:]:
        axis.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=100)
    plt.close(fig)


def _bars(axis: Any, results: list[dict[str, Any]], keys: tuple[str, ...], x: Any) -> None:
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        offset = x + (i - len(keys) / 2 + 0.5) * width
        axis.bar(offset, [r[key] for r in results], width, yerr=_std(results, key), label=key)


def _std(results: list[dict[str, Any]], key: str) -> list[float] | None:
    return [r[f"{key}_std"] for r in results] if f"{key}_std" in results[0] else None
