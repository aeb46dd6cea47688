"""The zero-shot report: `zero_shot.json` (every figure and the command that made it),
`zero_shot.md` (a table per suite, one row per bundle) and `zero_shot.png` (bars per suite),
each written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from index_builder.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from training.zero_shot.suites import Suite

JSON, MARKDOWN, PNG = "zero_shot.json", "zero_shot.md", "zero_shot.png"


def write_report(out: Path, report: dict[str, Any], suites: list[Suite]) -> list[Path]:
    """Write the three files into `out`; `report` holds "command", "bundles" and "results"
    ({bundle: {suite: metrics}})."""
    paths = [out / JSON, out / MARKDOWN, out / PNG]
    atomic_write_json(paths[0], report)
    atomic_write_text(paths[1], render_markdown(report, suites))
    atomic_write_bytes(paths[2], render_png(report, suites))
    return paths


def render_markdown(report: dict[str, Any], suites: list[Suite]) -> str:
    results = report["results"]
    lines = ["# Zero-shot evaluation", "", f"`{report['command']}`", ""]
    head = ["bundle", *(f"{s.name} ({s.columns[s.headline]})" for s in suites)]
    lines += _table(
        head,
        [
            [name, *(s.format(s.headline, results[name][s.name]) for s in suites)]
            for name in results
        ],
    )
    for suite in suites:
        lines += ["", f"## {suite.name}", "", suite.description, ""]
        lines += _table(
            ["bundle", *suite.columns.values()],
            [
                [name, *(suite.format(k, results[name][suite.name]) for k in suite.columns)]
                for name in results
            ],
        )
    lines += ["", "## Bundles", ""]
    lines += _table(
        ["bundle", "bundle_id", "path"],
        [[name, b["bundle_id"], b["path"]] for name, b in report["bundles"].items()],
        numbers=False,
    )
    return "\n".join(lines) + "\n"


def _table(head: list[str], rows: list[list[str]], numbers: bool = True) -> list[str]:
    """A Markdown table; with `numbers`, every column after the first is right-aligned."""
    return [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:" if numbers else "---"] * (len(head) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def render_png(report: dict[str, Any], suites: list[Suite]) -> bytes:
    """One panel per suite: its figures (as percent) grouped by metric, one bar per bundle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = list(results)
    fig, axes = plt.subplots(
        1, len(suites), figsize=(4.2 * len(suites), 3.6), squeeze=False, constrained_layout=True
    )
    width = 0.8 / max(len(names), 1)
    for ax, suite in zip(axes[0], suites, strict=True):
        keys = suite.plotted
        for b, name in enumerate(names):
            values = [suite.percent(k, results[name][suite.name]) for k in keys]
            xs = [i + (b - (len(names) - 1) / 2) * width for i in range(len(keys))]
            ax.bar(xs, values, width, label=name)
        ax.set_xticks(range(len(keys)), [suite.columns[k] for k in keys], rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("percent (MRR x 100)" if "mrr" in keys else "percent")
        ax.set_title(suite.name)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
