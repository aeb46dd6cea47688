"""What a benchmark's section of docs/benchmarks.md is made of (`Figure`), and the plotting
helpers the sections share. Each benchmark declares its own `FIGURE`; bench/report.py only
assembles them in order."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.tables import generic

NOTES = Path(__file__).parent / "notes"


@dataclass(frozen=True)
class Plot:
    key: str  # the PNG is named bench_<result stem>_<key>.png
    draw: Callable[[Any, Path], Path | None]  # (result, PNG path) -> the PNG, or None
    caption: str


@dataclass(frozen=True)
class Figure:
    name: str  # section title
    pattern: str  # glob under the results directory
    command: str  # how to produce it, when the JSON does not record its own
    plots: tuple[Plot, ...] = ()
    note: str = ""  # what the figure means or still lacks, shown whether it has run or not
    render: Callable[[Any], str] = generic  # one result file -> markdown


def note(name: str) -> str:
    """The text of bench/notes/<name>.md."""
    return (NOTES / f"{name}.md").read_text()


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    pyplot().close(fig)
    return out


def barh(labels: list[str], values: list[float], xlabel: str, out: Path) -> Path | None:
    if not values:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(values) + 1.2))
    ax.barh(labels, values)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    return save(fig, out)


def command_line(module: str, argv: list[str]) -> str:
    """The command that reruns a benchmark, as recorded in its result: `python -m bench.NAME`
    and its arguments (never the machine's path to the file)."""
    return shlex.join(["python", "-m", f"bench.{module}", *argv])
