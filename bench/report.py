"""Collect bench/results/*.json into docs/benchmarks.md: machine, tables, plots, commands.

    python bench/report.py [--results bench/results] [--out docs/benchmarks.md]

Every figure the issues ask for has a section; a figure whose JSON is missing is listed as
"not run yet" with its command. Result files are read defensively: the known shapes get
their own tables and plots, anything else a generic table per list or mapping of records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "onnxruntime", "faiss-cpu", "faiss-gpu", "numpy", "fastapi")
MAX_ROWS = 60
# Where a bench machine keeps its checkouts, runs and datasets: paths under these (or under the
# repository) are the machine's own and are shown relative. Container paths (/data/...) and
# URL paths (/search/...) mean the same on every machine and stay as they are.
HOST_DIRS = ("/tmp/", "/var/tmp/", "/work/", "/home/", "/root/", "/mnt/", "/srv/", "/scratch/")
ABSOLUTE = re.compile(r"(?<![\w.:/~-])/[\w.+@%-]+(?:/[\w.+@%{}-]+)*")


@dataclass(frozen=True)
class Figure:
    name: str  # section title
    pattern: str  # glob under the results directory
    command: str  # how to produce it, when the JSON does not record its own
    plots: tuple[str, ...] = ()  # names of plot functions in PLOTS
    note: str = ""  # what the figure means or still lacks, shown whether it has run or not


GPU_COMMAND = "python bench/gpu_train.py --device cuda"
REAL_EMBEDDINGS = " ".join(
    f"cots-data/real-embeddings/{name}" for name in ("openclipart", "emoji", "synthetic")
)
EMBED_GALLERY_NOTE = (Path(__file__).parent / "notes" / "embed_gallery.md").read_text()
REALISTIC_NOTE = (Path(__file__).parent / "notes" / "realistic.md").read_text()
REALISTIC_INDEX_NOTE = (Path(__file__).parent / "notes" / "realistic_index.md").read_text()
SERVICE_LOAD_NOTE = (Path(__file__).parent / "notes" / "service_load.md").read_text()
GPU_NOTE = (Path(__file__).parent / "notes" / "gpu.md").read_text()

FIGURES = (
    Figure(
        "Two-stream vs single-stream cross-encoder",
        "two_stream_vs_cross*.json",
        "python bench/two_stream_vs_cross.py --presets tiny,lite",
        ("ratio",),
    ),
    Figure(
        "Training throughput per recipe",
        "train_throughput*.json",
        "python bench/train_throughput.py --preset lite",
        ("train",),
    ),
    Figure(
        "Training cost of each COTS objective",
        "objective_cost*.json",
        "python bench/objective_cost.py --preset tiny",
        ("objectives",),
    ),
    Figure(
        "COTS ablation ladder",
        "ablation*.json",
        "cots ablate --data cots-data/datasets/openclipart --out cots-data/runs/ablation-cpu-300 "
        "--base training/recipes/ablation/cpu.yaml --tokenizer cots-data/tokenizers/lite-128 "
        "--seeds 0,1 --set train.max_steps=300 "
        "--set train.eval_every=100 --set objectives.mvlm.weight=0.1 "
        "&& cp cots-data/runs/ablation-cpu-300/ablation.json bench/results/ablation_cpu.json",
    ),
    Figure(
        "COOKIE ablation ladder",
        "cookie_ladder*.json",
        "cots ablate --ladder cookie --data cots-data/datasets/openclipart "
        "--out cots-data/runs/ladder-cookie --seeds 0,1 --set train.max_steps=300 "
        "--set train.eval_every=100 "
        "&& cp cots-data/runs/ladder-cookie/ablation.json bench/results/cookie_ladder_cpu.json",
    ),
    Figure(
        "Transfer to galleries never trained on",
        "transfer*.json",
        "python bench/transfer.py --run RECIPE:SEED=RUN ... --eval NAME:SPLIT=DATASET ... "
        "--out bench/results/transfer_cpu.json",
    ),
    Figure(
        "Adaptive momentum filter on noisy pairs",
        "noise_filter*.json",
        "python bench/noise_filter.py --data cots-data/datasets/openclipart "
        "--lam 2 --lam 1 --lam 0.5 "
        "&& cp cots-data/runs/noise-filter/noise_filter.json bench/results/",
    ),
    Figure(
        "Embedding throughput per bundle variant",
        "embed_throughput*.json",
        "python bench/embed_throughput.py",
    ),
    Figure(
        "Gallery embedding on CPU, end to end",
        "embed_gallery*.json",
        "python bench/embed_gallery.py --bundle BUNDLE --data cots-data/datasets/openclipart",
        note=EMBED_GALLERY_NOTE,
    ),
    Figure(
        "Training and embedding on a GPU",
        "gpu_train*.json",
        GPU_COMMAND,
        note=GPU_NOTE,
    ),
    Figure(
        "Index types: recall, latency, gallery size",
        "index_bench*.json",
        "python bench/index_bench.py",
        ("recall_latency", "latency_size"),
    ),
    Figure(
        "Realistic 1M gallery: real against generated embeddings",
        "realistic_gallery*.json",
        f"python bench/realistic_gallery.py --real {REAL_EMBEDDINGS} --size 1000000",
        note=REALISTIC_NOTE,
    ),
    Figure(
        "Index types on a realistic gallery, cross-modal queries",
        "realistic_index*.json",
        f"python -m bench.realistic_index --real {REAL_EMBEDDINGS} --size 1000000",
        note=REALISTIC_INDEX_NOTE,
    ),
    Figure(
        "FAISS exact search: SIMD loop or BLAS, by query batch",
        "blas_threshold*.json",
        "python bench/blas_threshold.py",
        note="index_builder.backends.recall.BLAS_THRESHOLD (queries x dimension) switches to BLAS "
        "from 4 queries at d=256: below that, BLAS costs up to 5x more per query.",
    ),
    Figure(
        "Service load",
        "service_load*.json",
        "python -m bench.service_load --demo-images 2000",
        ("service",),
        note=SERVICE_LOAD_NOTE,
    ),
    Figure(
        "Text-to-video: meanP vs seqTransf, video indexing throughput",
        "video*.json",
        "python bench/video_bench.py --count 400 --threads 1",
    ),
    Figure(
        "Service soak",
        "soak*.json",
        "python -m bench.soak --minutes 3",
        ("soak",),
    ),
    Figure(
        "Filtered search and live changes of a collection",
        "collection*.json",
        "python bench/collection_bench.py --size 100000 --threads 2",
    ),
    Figure(
        "Search backends: FAISS files and Milvus (milvus-lite)",
        "backends*.json",
        "python bench/backends.py --size 100000 --threads 2",
    ),
    Figure(
        "Service attack (issue 25)",
        "attack*.json",
        "python bench/attack.py",
        note="Bad requests, a burst of maximum-size images, files truncated and a change "
        "killed under a running server (FAISS and milvus-lite, the colour towers): the "
        "issue's goals, then one row per case. `5xx` excludes the documented answers about "
        "the server's state (503 `index_corrupt`/`busy`, 507), counted in `state 5xx`. On "
        "the 2-core machine shared with a training job, /health during one maximum-size PNG "
        "varied from 10 to 45 ms over six runs (93 ms once), so that goal holds with little "
        "margin.",
    ),
)


# -- reading -----------------------------------------------------------------------------------


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": scalar}; lists of scalars become one comma-joined cell."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and all(is_scalar(v) for v in value):
            out[name] = ", ".join(fmt(v) for v in value)
        elif is_scalar(value):
            out[name] = value
    return out


def record_tables(obj: Any, path: str = "") -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(path, rows) for every list of dicts and every mapping whose values are all dicts."""
    if isinstance(obj, list):
        if obj and all(isinstance(v, dict) for v in obj):
            yield path, [flatten(v) for v in obj]
        for i, value in enumerate(obj):
            yield from record_tables(value, f"{path}[{i}]")
    elif isinstance(obj, dict):
        if len(obj) > 1 and all(isinstance(v, dict) for v in obj.values()):
            yield path, [{"name": k, **flatten(v)} for k, v in obj.items()]
            return
        for key, value in obj.items():
            yield from record_tables(value, f"{path}.{key}" if path else key)


def shallow(obj: dict) -> dict[str, Any]:
    """A record's own fields: its scalars and those of child dicts that hold only scalars."""
    own = {k: v for k, v in obj.items() if is_scalar(v) or isinstance(v, dict)}
    return flatten(
        {k: v for k, v in own.items() if is_scalar(v) or all(map(is_scalar, v.values()))}
    )


def records(obj: Any, context: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    """Every dict in `obj` with the keys that lead to it and its own fields."""
    if isinstance(obj, dict):
        yield context, shallow(obj)
        for key, value in obj.items():
            yield from records(value, (*context, str(key)))
    elif isinstance(obj, list):
        for value in obj:
            yield from records(value, context)


def load_results(results: Path) -> dict[Path, Any]:
    out = {}
    for path in sorted(results.glob("*.json")):
        try:
            out[path] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            out[path] = {"error": f"unreadable: {exc}"}
    return out


# -- markdown ----------------------------------------------------------------------------------


def host_paths(obj: Any) -> set[str]:
    """The absolute paths of the bench machine named in any string of a result."""
    if isinstance(obj, dict):
        return set().union(set(), *(host_paths(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(set(), *(host_paths(v) for v in obj))
    if not isinstance(obj, str):
        return set()
    found = {m.group(0) for m in ABSOLUTE.finditer(obj)}
    return {p for p in found if p.startswith((*HOST_DIRS, f"{ROOT}/"))}


def relative_to_machine(data: Any) -> tuple[Any, str]:
    """`data` with the bench machine's absolute paths made relative (to the repository, from a
    `cots-data` directory on, or else to the directory all of them share), and a line saying
    what the rest are relative to ("" when no path needed it)."""
    paths = host_paths(data)
    if not paths:
        return data, ""
    rest = [p for p in paths if not p.startswith(f"{ROOT}/") and "/cots-data/" not in p]
    base = os.path.commonpath([os.path.dirname(p) for p in rest]) if rest else ""
    mapping = {}
    for path in paths:
        if path.startswith(f"{ROOT}/"):
            mapping[path] = os.path.relpath(path, ROOT)
        elif "/cots-data/" in path:
            mapping[path] = "cots-data/" + path.split("/cots-data/", 1)[1]
        else:
            mapping[path] = os.path.relpath(path, base)

    def rewrite(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: rewrite(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [rewrite(v) for v in obj]
        if isinstance(obj, str):
            return ABSOLUTE.sub(lambda m: mapping.get(m.group(0), m.group(0)), obj)
        return obj

    note = (
        "Paths are relative to the directory that held the runs and datasets on the machine "
        "that ran it.\n"
        if rest
        else ""
    )
    return rewrite(data), note


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if value and abs(value) < 1e-3 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A markdown table; columns default to the union of keys in order of appearance."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    shown = rows[:MAX_ROWS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in shown]
    if len(rows) > len(shown):
        lines.append(f"\n({len(rows) - len(shown)} more rows in the JSON)")
    return "\n".join(lines)


def generic(data: Any) -> str:
    """Settings (top-level scalars) then one table per list or mapping of records."""
    parts = []
    if isinstance(data, dict):
        settings = {k: v for k, v in flatten(data).items() if "." not in k and k != "command"}
        if settings:
            parts.append(table([{"setting": k, "value": v} for k, v in settings.items()]))
    for path, rows in record_tables(data):
        parts.append(f"`{path or 'rows'}`\n\n{table(rows)}")
    return "\n\n".join(parts) or "(no tabular data)"


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


def backend_tables(data: dict) -> str:
    """One row per backend run: index, build, recall (recorded and measured), latency,
    filtered search and the cost of a change; the result's own caveat first."""
    rows = [
        {
            "backend": run["backend"],
            "index": run["index"],
            "search params": run["search_params"],
            "build s": run["build_seconds"],
            "recall@10 recorded": run["recorded_recall_at_10"],
            "recall@10": run["search"]["recall_at_10"],
            "p50 ms": run["search"]["p50_ms"],
            "p99 ms": run["search"]["p99_ms"],
            "batch 32, ms/query": run["search"]["batch32_ms_per_query"],
            "filtered 10%: recall@10": run["filtered_10pct"]["recall_at_10"],
            "filtered 10%: p50 ms": run["filtered_10pct"]["p50_ms"],
            "add 1%, s": run["add_1pct_seconds"],
        }
        for run in data.get("runs", [])
    ]
    note = f"{data['note'][0].upper()}{data['note'][1:]}.\n\n" if data.get("note") else ""
    size = f"{data.get('size')} items of dimension {data.get('dim')}.\n\n"
    return note + size + table(rows)


def variant_tables(data: dict) -> str:
    """embed_throughput: the settings, then one row per bundle variant (fp32, int8, ...)."""
    variants = {k: v for k, v in data.items() if isinstance(v, dict) and "images_per_s" in v}
    rows = [{"variant": name, **flatten(row)} for name, row in variants.items()]
    rest = generic({k: v for k, v in data.items() if k not in variants})
    return f"{rest}\n\n{table(rows)}" if rows else rest


def _quantiles(value: Any) -> str:
    """A p5 / p50 / p95 cell from a mapping of quantiles; a scalar as it is."""
    if isinstance(value, dict):
        return " / ".join(fmt(value.get(q)) for q in ("p5", "p50", "p95"))
    return fmt(value)


def gallery_tables(data: dict) -> str:
    """realistic_gallery: the real and the generated gallery at the same size, statistic by
    statistic (p5 / p50 / p95), the model and its counts, then the full-size gallery."""
    real, model, big = data.get("real", {}), data.get("model", {}), data.get("generated", {})
    counts = (
        f"Model: {fmt(model.get('clusters'))} image clusters of rank {fmt(model.get('rank'))}, "
        f"fitted in {fmt(model.get('fit_seconds'))} s on {fmt(real.get('fit_images'))} real "
        f"images and {fmt(real.get('fit_captions'))} captions; held out as queries: "
        f"{fmt(real.get('query_images'))} images, {fmt(real.get('query_captions'))} captions "
        f"(real embeddings: {', '.join(f'`{r}`' for r in real.get('roots', []))})."
    )
    same = [
        {"statistic": name, "real p5 / p50 / p95": _quantiles(pair.get("real"))}
        | {"generated p5 / p50 / p95": _quantiles(pair.get("generated"))}
        for name, pair in data.get("same_size_comparison", {}).items()
    ]
    size = f"{fmt(big.get('size'))} items per side, sampled in {fmt(big.get('sample_seconds'))} s"
    full = [
        {"statistic": name, "generated p5 / p50 / p95": _quantiles(value)}
        for name, value in big.items()
        if isinstance(value, dict)
    ]
    parts = [counts, "Real against generated, both at the real gallery's size:", table(same)]
    parts += [f"The generated gallery at full size ({size}):", table(full)] if full else []
    return "\n\n".join(parts)


RECALL_GOAL = 0.95


def _setting(point: dict) -> str:
    """`nprobe=64, rerank 2` from a point of realistic_index (`exact` for a flat index)."""
    param = next(k for k in point if k not in ("rerank", "recall", "p50_ms"))
    name = param if param == "exact" else f"{param}={fmt(point[param])}"
    return f"{name}, rerank {fmt(point.get('rerank'))}"


def index_type_row(name: str, variant: dict) -> dict[str, Any]:
    """One index type: its size and build time, the lowest-latency setting that reaches
    RECALL_GOAL, and the best recall it reaches at all (the faster setting on a tie)."""
    points = variant.get("points", [])
    reaching = [p for p in points if p["recall"] >= RECALL_GOAL]
    cheapest: dict = min(reaching, key=lambda p: p["p50_ms"], default={})
    best: dict = min(points, key=lambda p: (-p["recall"], p["p50_ms"]), default={})
    setting = _setting(cheapest) if cheapest else "not reached"
    return {
        "variant": name,
        "factory": variant.get("factory"),
        "build s": variant.get("build_seconds"),
        "MB": variant["bytes"] / 1e6 if isinstance(variant.get("bytes"), int) else None,
        f"cheapest setting to recall {RECALL_GOAL}": setting,
        "its recall": cheapest.get("recall"),
        "its p50 ms": cheapest.get("p50_ms"),
        "best recall": best.get("recall"),
        "best recall's p50 ms": best.get("p50_ms"),
    }


def index_type_tables(data: dict) -> str:
    """realistic_index: per query direction, one row per index type (index_type_row)."""
    head = (
        f"{fmt(data.get('size'))} items per side, {fmt(data.get('queries'))} held-out real "
        f"queries per direction; recall@{fmt(data.get('k'))} against exact search."
    )
    parts = [head]
    for direction, variants in data.get("results", {}).items():
        rows = [index_type_row(name, variant) for name, variant in variants.items()]
        parts += [f"**{direction}**", table(rows)]
    return "\n\n".join(parts)


def _params(value: Any) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in value.items()) if isinstance(value, dict) else ""


def service_tables(data: Any) -> str:
    """service_load: issue 13's goals first when the run checked them, then the index each
    side served and the server's memory when recorded, then everything else (generic)."""
    if not isinstance(data, dict):
        return generic(data)
    parts, shown = [], {"goals"}
    if data.get("goals"):
        rows = [{**goal, "met": "yes" if goal.get("met") else "no"} for goal in data["goals"]]
        parts.append(
            "#### Goals (issue 13)\n\n" + table(rows, ["goal", "measured", "met", "held by"])
        )
    index = data.get("index", {})
    if isinstance(index.get("build_seconds"), dict):
        parts.append("Index served, tuned at build:\n\n" + table(served_index_rows(index)))
        shown.add("index")
    memory = data.get("server_memory_bytes")
    if isinstance(memory, dict):
        parts.append(memory_line(data, memory))
        shown |= {"server_memory_bytes", "raw_vectors_bytes", "server_memory_over_raw_vectors"}
    parts.append(generic({k: v for k, v in data.items() if k not in shown}))
    return "\n\n".join(parts)


def served_index_rows(index: dict) -> list[dict[str, Any]]:
    """One row per side of a service_load index: factory, tuned setting, recall, build time."""
    sides = index.get("factories", {})
    return [
        {
            "side": side,
            "factory": factory,
            "search params": _params(index.get("search_params", {}).get(side)),
            "recall@10 at build": index.get("recall_at_10", {}).get(side),
            "build s": index["build_seconds"].get(side),
        }
        for side, factory in sides.items()
    ]


def memory_line(data: dict, memory: dict) -> str:
    sizes = ", ".join(f"{key} {fmt(value / 1e6)} MB" for key, value in memory.items())
    raw = data.get("raw_vectors_bytes")
    raw_text = f"; raw vectors {fmt(raw / 1e6)} MB" if isinstance(raw, int) else ""
    ratio = data.get("server_memory_over_raw_vectors")
    ratio_text = f", server memory / raw vectors = {fmt(ratio)}" if ratio is not None else ""
    return f"Server memory: {sizes}{raw_text}{ratio_text}."


ATTACK_COLUMNS = [
    "backend",
    "case",
    "statuses",
    "max_bytes",
    "seconds",
    "health_max_ms",
    "fivexx",
    "state_5xx",
    "ready_200_in_5s",
    "search_after",
]


def attack_tables(data: Any) -> str:
    """bench/attack.py: the goals, then one row per case (the case's own figures, such as
    RSS or stray files, in a last column)."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        return generic(data)
    verdict = {True: "PASS", False: "FAIL"}
    goals = [{**g, "pass": verdict.get(g.get("pass"), "n/a")} for g in data.get("goals", [])]
    rows = []
    for row in data["rows"]:
        extra = {k: v for k, v in row.items() if k not in ATTACK_COLUMNS and k not in SKIPPED}
        shown = {k: row.get(k) for k in ATTACK_COLUMNS}
        shown["statuses"] = " ".join(row.get("statuses") or [])
        rows.append({**shown, "also": _extras(extra)})
    return "\n\n".join(
        [table(goals, ["goal", "pass", "detail"]), table(rows, [*ATTACK_COLUMNS, "also"])]
    )


SKIPPED = {"requests", "max_request_s", "health_p50_ms", "health_failures", "transport_errors"}


def _extras(extra: dict[str, Any]) -> str:
    return ", ".join(f"{k} {fmt(v)}" for k, v in extra.items() if k not in ("ready_s",))


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


RENDERERS: dict[str, Callable[[Any], str]] = {
    "transfer": transfer_tables,
    "attack": attack_tables,
    "two_stream_vs_cross": ratio_tables,
    "backends": backend_tables,
    "embed_throughput": variant_tables,
    "realistic_gallery": gallery_tables,
    "realistic_index": index_type_tables,
    "service_load": service_tables,
}


# -- plots -------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def plot_ratio(data: Any, out: Path) -> Path | None:
    bars = [
        (f"{r.get('preset')}\n{name}", s.get("ratio"), s.get("query_ratio"))
        for r in data.get("results", [])
        for name, s in r.get("shapes", {}).items()
    ]
    bars = [b for b in bars if isinstance(b[1], int | float) and isinstance(b[2], int | float)]
    if not bars:
        return None
    plt = _pyplot()
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
    return _save(fig, out)


def _barh(labels: list[str], values: list[float], xlabel: str, out: Path) -> Path | None:
    if not values:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(values) + 1.2))
    ax.barh(labels, values)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    return _save(fig, out)


def plot_train(data: Any, out: Path) -> Path | None:
    rows = [r for _, r in records(data) if isinstance(r.get("pairs_per_s"), int | float)]
    labels = [
        " / ".join(str(r[k]) for k in ("recipe", "setting", "preset", "batch") if k in r)
        for r in rows
    ]
    return _barh(labels, [r["pairs_per_s"] for r in rows], "pairs per second (train step)", out)


def plot_objectives(data: Any, out: Path) -> Path | None:
    configs = data.get("configs", {}) if isinstance(data, dict) else {}
    rows = [(k, v.get("pairs_per_s")) for k, v in configs.items() if isinstance(v, dict)]
    rows = [(k, v) for k, v in rows if isinstance(v, int | float)]
    return _barh([k for k, _ in rows], [v for _, v in rows], "pairs per second", out)


def plot_service(data: Any, out: Path) -> Path | None:
    endpoints = data.get("endpoints", {}) if isinstance(data, dict) else {}
    labels, values = [], []
    for endpoint, runs in endpoints.items():
        for run in runs if isinstance(runs, list) else []:
            if isinstance(run, dict) and isinstance(run.get("p50_ms"), int | float):
                labels.append(f"{endpoint} c={run.get('concurrency')}")
                values.append(run["p50_ms"])
    return _barh(labels, values, "p50 latency (ms)", out)


def plot_soak(data: Any, out: Path) -> Path | None:
    rows = data.get("minutes", []) if isinstance(data, dict) else []
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("p99_ms"), int | float)]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    minutes = [r["minute"] for r in rows]
    for key in ("p50_ms", "p99_ms"):
        ax.plot(minutes, [r[key] for r in rows], "o-", label=key.replace("_ms", ""))
    ax.set_xlabel("minute")
    ax.set_ylabel("latency (ms)")
    ax.legend(loc="upper left")
    rss = [r.get("rss_max_mb") for r in rows]
    if all(isinstance(v, int | float) for v in rss):
        twin = ax.twinx()
        twin.plot(minutes, rss, "k--", label="server RSS")
        twin.set_ylabel("server RSS (MB)")
        twin.set_ylim(0, max(rss) * 1.2)
        twin.legend(loc="upper right")
    return _save(fig, out)


RECALL = re.compile(r"recall.*10|r@?10", re.I)
LATENCY = re.compile(r"latency|_ms$|ms_|p50", re.I)
SIZE_KEYS = ("gallery", "gallery_size", "size", "n", "count", "vectors", "ntotal", "images")
TYPE_KEYS = ("index_type", "factory", "index", "type", "kind", "method", "name")


def _pick(row: dict, pattern: re.Pattern, avoid: str = "build|batch|qps") -> str | None:
    keys = [k for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    keys = [k for k in keys if pattern.search(k) and not re.search(avoid, k, re.I)]
    preferred = [k for k in keys if re.search(r"single|query|p50|search", k, re.I)]
    return (preferred or keys or [None])[0]


def index_points(data: Any) -> list[dict[str, Any]]:
    """(type, size, recall, latency) from any records carrying a latency, found by key names;
    type and size come from the record or from the keys that lead to it."""
    points = []
    for context, row in records(data):
        latency = _pick(row, LATENCY)
        if latency is None:
            continue
        recall = _pick(row, RECALL, avoid="target")
        # A record without a type names its series by its latency key (e.g. a "floor_ms").
        kind = next((str(row[k]) for k in TYPE_KEYS if isinstance(row.get(k), str)), None)
        kind = kind or latency.rsplit(".", 1)[-1]
        size = next((row[k] for k in SIZE_KEYS if isinstance(row.get(k), int)), None)
        if size is None:
            size = next((int(c) for c in reversed(context) if c.isdigit()), None)
        points.append(
            {
                "type": kind,
                "size": size,
                "recall": row.get(recall) if recall else None,
                "latency": row[latency],
                "latency_key": latency.rsplit(".", 1)[-1],
            }
        )
    return points


def plot_recall_latency(data: Any, out: Path) -> Path | None:
    points = [p for p in index_points(data) if isinstance(p["recall"], int | float)]
    # points of one type come from different gallery sizes: mark each with its size, unjoined
    return _scatter(points, "latency", "recall", "recall@10", out, logx=True, join=False)


def plot_latency_size(data: Any, out: Path) -> Path | None:
    points = [p for p in index_points(data) if isinstance(p["size"], int)]
    return _scatter(points, "size", "latency", "gallery size", out, logx=True, logy=True)


def _scatter(
    points: list[dict],
    x: str,
    y: str,
    label: str,
    out: Path,
    logx: bool,
    logy: bool = False,
    join: bool = True,
) -> Path | None:
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in dict.fromkeys(p["type"] for p in points):
        mine = sorted((p for p in points if p["type"] == kind), key=lambda p: p[x])
        style = "k--" if "floor" in kind else ("o-" if join else "o")  # a floor is a bound
        ax.plot([p[x] for p in mine], [p[y] for p in mine], style, label=kind)
        for p in mine if not join else []:
            if isinstance(p["size"], int):
                ax.annotate(f"{p['size']:,}", (p[x], p[y]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
    unit = " (ms)" if all("ms" in p["latency_key"] for p in points) else ""
    latency_label = f"latency{unit}"
    ax.set_xlabel(latency_label if x == "latency" else label)
    ax.set_ylabel(latency_label if y == "latency" else label)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.legend(fontsize=8)
    return _save(fig, out)


PLOTS: dict[str, tuple[Callable[[Any, Path], Path | None], str]] = {
    "ratio": (plot_ratio, "two-stream vs cross-encoder: time ratio (log scale)"),
    "train": (plot_train, "training throughput per recipe"),
    "objectives": (plot_objectives, "training throughput per objective"),
    "service": (plot_service, "service p50 latency per endpoint and concurrency"),
    "soak": (plot_soak, "soak: p50/p99 latency and server RSS per minute"),
    "recall_latency": (plot_recall_latency, "recall@10 against latency per index type"),
    "latency_size": (plot_latency_size, "latency against gallery size per index type"),
}


# -- machine -----------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    info = {"platform": platform.platform(), "python": platform.python_version()}
    info["cpu"] = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown"
    info["cores"] = str(os.cpu_count())
    mem_kb = _proc_field("/proc/meminfo", "MemTotal")
    if mem_kb:
        info["memory"] = f"{int(mem_kb.split()[0]) / 2**20:.1f} GiB"
    for name in LIBRARIES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return info


def _proc_field(path: str, field: str) -> str | None:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(field)), None)


# -- assembly ----------------------------------------------------------------------------------


def section(
    figure: Figure, results: dict[Path, Any], img_dir: Path, md_dir: Path
) -> tuple[str, list[Path]]:
    mine = [p for p in results if p.match(figure.pattern)]
    head = f"## {figure.name}\n" + (f"\n{figure.note.strip()}\n" if figure.note else "")
    if not mine:
        return f"{head}\nnot run yet: `{figure.command}`\n", []
    parts, images = [head], []
    for path in mine:
        data, paths_note = relative_to_machine(results[path])
        recorded = isinstance(data, dict) and isinstance(data.get("command"), str)
        when = datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y-%m-%d %H:%M UTC")
        parts.append(f"### `{path.name}` ({when})\n")
        if recorded:
            parts.append(f"Command: `{data['command']}`\n")
        else:
            parts.append(f"Command (not recorded in the JSON; how to run it): `{figure.command}`\n")
        parts.append(paths_note)
        parts.append(_recorded_machine(data))
        render = next((fn for key, fn in RENDERERS.items() if path.stem.startswith(key)), generic)
        parts.append(render(data) + "\n")
        for plot in figure.plots:
            fn, caption = PLOTS[plot]
            png = fn(data, img_dir / f"bench_{path.stem}_{plot}.png")
            if png is not None:
                images.append(png)
                parts.append(f"![{caption}]({os.path.relpath(png, md_dir)})\n")
        picture = recorded_picture(results[path], img_dir)  # as recorded: a real path
        if picture is not None:
            parts.append(f"![{figure.name}]({os.path.relpath(picture, md_dir)})\n")
    return "\n".join(p for p in parts if p), images


def recorded_picture(data: Any, img_dir: Path) -> Path | None:
    """The picture a bench script drew itself (its `picture` field) when the file is here: at
    the recorded path (a relative one from the repository root), else under the same name in
    the report's image directory (a result recorded in another checkout)."""
    if not isinstance(data, dict) or not isinstance(data.get("picture"), str):
        return None
    recorded = ROOT / data["picture"]
    return next((p for p in (recorded, img_dir / recorded.name) if p.is_file()), None)


def _recorded_machine(data: Any) -> str:
    if not isinstance(data, dict):
        return ""
    cells = []
    for key in ("machine", "host", "device", "threads"):
        value = data.get(key)
        if isinstance(value, dict):
            value = ", ".join(f"{a}={fmt(b)}" for a, b in flatten(value).items())
        if value is not None:
            cells.append(f"{key}: {fmt(value)}")
    return "Recorded with the result: " + "; ".join(cells) + "\n" if cells else ""


def build_report(results_dir: Path, out: Path, img_dir: Path) -> list[Path]:
    """Write the markdown report and its plots; return every file written."""
    results = load_results(results_dir)
    info = machine()
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python bench/report.py` from `bench/results/*.json`; run everything with "
        "`bench/run_all.sh` (`--full` for the long settings). Figures on a shared machine are "
        "indicative: each section names the command that produced it and the load it ran under.",
        "",
        "## Machine (where this report was generated)",
        "",
        table([{"": k, "value": v} for k, v in info.items()]),
        "",
    ]
    written: list[Path] = []
    claimed: set[Path] = set()
    for figure in FIGURES:
        text, images = section(figure, results, img_dir, out.parent)
        lines += [text]
        written += images
        claimed |= {p for p in results if p.match(figure.pattern)}
    others = [p for p in results if p not in claimed]
    if others:
        lines.append("## Other results\n")
        for path in others:
            data, paths_note = relative_to_machine(results[path])
            lines += [f"### `{path.name}`\n", paths_note, generic(data), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    return [out, *written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results", type=Path, default=ROOT / "bench/results", help="directory of result JSON"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs/benchmarks.md", help="markdown file to write"
    )
    parser.add_argument("--img", type=Path, default=ROOT / "docs/img", help="directory for PNGs")
    args = parser.parse_args(argv)
    for path in build_report(args.results, args.out, args.img):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
