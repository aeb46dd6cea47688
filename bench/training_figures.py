"""The report sections of the benchmarks that train or run torch models (two_stream_vs_cross,
train_throughput, objective_cost, noise_filter, gpu_train, the ablation ladders): kept apart
from those scripts so that writing the report never imports torch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.figure import Figure, Plot, barh, note, pyplot, save
from bench.tables import records, table


def ratio_tables(data: dict) -> str:
    """two_stream_vs_cross.json: the ratio per preset and shape, then the measured unit costs."""
    shapes, costs = [], []
    for row in data.get("results", []):
        for name, s in row.get("shapes", {}).items():
            shapes.append(
                {
                    "preset": row.get("preset"),
                    "two-stream on": row.get("backend"),
                    "shape": name,
                    "images x queries": f"{s.get('images', 0):,} x {s.get('queries', 0):,}",
                    "two-stream s": s.get("two_stream_s"),
                    "cross-encoder s": s.get("cross_encoder_s"),
                    "ratio": s.get("ratio"),
                    "two-stream ms/query": s.get("two_stream_query_ms"),
                    "cross-encoder ms/query": s.get("cross_encoder_query_ms"),
                    "per-query ratio": s.get("query_ratio"),
                }
            )
        two, cross = row.get("two_stream", {}), row.get("cross_encoder", {})
        costs.append(
            {
                "preset": row.get("preset"),
                "two-stream params": two.get("params"),
                "ms/image": 1000 * two.get("image_s", math.nan),
                "ms/caption": 1000 * two.get("text_s", math.nan),
                "ms/query text": 1000 * two.get("text_query_s", math.nan),
                "cross layers x width": f"{cross.get('layers')} x {cross.get('width')}",
                "cross params": cross.get("params"),
                "tokens (text+image)": f"{cross.get('text_tokens')}+{cross.get('image_tokens')}",
                "cross ms/image features": 1000 * cross.get("image_s", math.nan),
                "cross ms/pair": 1000 * cross.get("pair_s", math.nan),
            }
        )
    notes = [
        "The cross-encoder runs its joint transformer Q x N times, the two-stream model its "
        "towers N + Q times, so the full-ranking ratio grows with the gallery.",
        f"Method: {data['method']}." if data.get("method") else "",
    ]
    if data.get("paper_ratio"):
        notes.append(f"The paper reports {data['paper_ratio']:,}x against VinVL.")
    return "\n\n".join([table(shapes), table(costs), " ".join(notes).strip()])


def plot_ratio(data: Any, out: Path) -> Path | None:
    bars = [
        (f"{r.get('preset')}\n{name}", s.get("ratio"), s.get("query_ratio"))
        for r in data.get("results", [])
        for name, s in r.get("shapes", {}).items()
    ]
    bars = [b for b in bars if isinstance(b[1], int | float) and isinstance(b[2], int | float)]
    if not bars:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(bars))
    ax.bar([i - 0.2 for i in x], [b[1] for b in bars], 0.4, label="full ranking")
    ax.bar([i + 0.2 for i in x], [b[2] for b in bars], 0.4, label="per query")
    if data.get("paper_ratio"):
        ax.axhline(data["paper_ratio"], color="grey", ls="--", label="paper vs VinVL")
    ax.set_xticks(list(x), [b[0] for b in bars], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("cross-encoder time / two-stream time")
    ax.legend()
    return save(fig, out)


def plot_train(data: Any, out: Path) -> Path | None:
    rows = [r for _, r in records(data) if isinstance(r.get("pairs_per_s"), int | float)]
    labels = [
        " / ".join(str(r[k]) for k in ("recipe", "setting", "preset", "batch") if k in r)
        for r in rows
    ]
    return barh(labels, [r["pairs_per_s"] for r in rows], "pairs per second (train step)", out)


def plot_objectives(data: Any, out: Path) -> Path | None:
    configs = data.get("configs", {}) if isinstance(data, dict) else {}
    rows = [(k, v.get("pairs_per_s")) for k, v in configs.items() if isinstance(v, dict)]
    rows = [(k, v) for k, v in rows if isinstance(v, int | float)]
    return barh([k for k, _ in rows], [v for _, v in rows], "pairs per second", out)


TWO_STREAM = Figure(
    "Two-stream vs single-stream cross-encoder",
    "two_stream_vs_cross*.json",
    "python -m bench.two_stream_vs_cross --presets tiny,lite",
    (Plot("ratio", plot_ratio, "two-stream vs cross-encoder: time ratio (log scale)"),),
    render=ratio_tables,
)
TRAIN_THROUGHPUT = Figure(
    "Training throughput per recipe",
    "train_throughput*.json",
    "python -m bench.train_throughput --preset lite",
    (Plot("train", plot_train, "training throughput per recipe"),),
)
OBJECTIVE_COST = Figure(
    "Training cost of each COTS objective",
    "objective_cost*.json",
    "python -m bench.objective_cost --preset tiny",
    (Plot("objectives", plot_objectives, "training throughput per objective"),),
)
ABLATION = Figure(
    "COTS ablation ladder",
    "ablation*.json",
    "cots ablate --data cots-data/datasets/openclipart --out cots-data/runs/ablation-cpu-300 "
    "--base training/recipes/ablation/cpu.yaml --tokenizer cots-data/tokenizers/lite-128 "
    "--seeds 0,1 --set train.max_steps=300 "
    "--set train.eval_every=100 --set objectives.mvlm.weight=0.1 "
    "&& cp cots-data/runs/ablation-cpu-300/ablation.json bench/results/ablation_cpu.json",
)
COOKIE_LADDER = Figure(
    "COOKIE ablation ladder",
    "cookie_ladder*.json",
    "cots ablate --ladder cookie --data cots-data/datasets/openclipart "
    "--out cots-data/runs/ladder-cookie --seeds 0,1 --set train.max_steps=300 "
    "--set train.eval_every=100 "
    "&& cp cots-data/runs/ladder-cookie/ablation.json bench/results/cookie_ladder_cpu.json",
)
NOISE_FILTER = Figure(
    "Adaptive momentum filter on noisy pairs",
    "noise_filter*.json",
    "python -m bench.noise_filter --data cots-data/datasets/openclipart "
    "--lam 2 --lam 1 --lam 0.5 "
    "&& cp cots-data/runs/noise-filter/noise_filter.json bench/results/",
)
GPU_TRAIN = Figure(
    "Training and embedding on a GPU",
    "gpu_train*.json",
    "python -m bench.gpu_train --device cuda",
    note=note("gpu"),
)
