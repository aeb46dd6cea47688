"""Collect bench/results/*.json into docs/benchmarks.md: machine, tables, plots, commands.

    python -m bench.report [--results bench/results] [--out docs/benchmarks.md]

Every figure the issues ask for has a section, declared by its benchmark (a `FIGURE`: title,
result files, command, renderer, plots); this module only assembles them in order. A figure
whose JSON is missing is listed as "not run yet" with its command; a result no figure claims
gets a generic table per list or mapping of records (bench/tables.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import (
    attack,
    backends,
    blas_threshold,
    changes_at_scale,
    collection_bench,
    embed_gallery,
    embed_throughput,
    first_change,
    index_bench,
    realistic_gallery,
    realistic_index,
    scale_curve,
    service_backends,
    service_load,
    soak,
    training_figures,
    transfer,
    video_bench,
)
from bench.figure import Figure
from bench.tables import flatten, fmt, generic, table

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "onnxruntime", "faiss-cpu", "faiss-gpu", "numpy", "fastapi")
# Where a bench machine keeps its checkouts, runs and datasets: paths under these (or under the
# repository) are the machine's own and are shown relative. Container paths (/data/...) and
# URL paths (/search/...) mean the same on every machine and stay as they are.
HOST_DIRS = ("/tmp/", "/var/tmp/", "/work/", "/home/", "/root/", "/mnt/", "/srv/", "/scratch/")
ABSOLUTE = re.compile(r"(?<![\w.:/~-])/[\w.+@%-]+(?:/[\w.+@%{}-]+)*")

FIGURES: tuple[Figure, ...] = (
    training_figures.TWO_STREAM,
    training_figures.TRAIN_THROUGHPUT,
    training_figures.OBJECTIVE_COST,
    training_figures.ABLATION,
    training_figures.COOKIE_LADDER,
    transfer.FIGURE,
    training_figures.NOISE_FILTER,
    embed_throughput.FIGURE,
    embed_gallery.FIGURE,
    training_figures.GPU_TRAIN,
    index_bench.FIGURE,
    realistic_gallery.FIGURE,
    realistic_index.FIGURE,
    blas_threshold.FIGURE,
    service_load.FIGURE,
    scale_curve.FIGURE,
    changes_at_scale.FIGURE,
    first_change.FIGURE,
    service_backends.FIGURE,
    video_bench.FIGURE,
    soak.FIGURE,
    collection_bench.FIGURE,
    backends.FIGURE,
    attack.FIGURE,
)


# -- reading -----------------------------------------------------------------------------------


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
        when = measured_when(path).strftime("%Y-%m-%d %H:%M UTC")
        parts.append(f"### `{path.name}` ({when})\n")
        if recorded:
            parts.append(f"Command: `{data['command']}`\n")
        else:
            parts.append(f"Command (not recorded in the JSON; how to run it): `{figure.command}`\n")
        parts.append(paths_note)
        parts.append(_recorded_machine(data))
        parts.append(figure.render(data) + "\n")
        for plot in figure.plots:
            png = plot.draw(data, img_dir / f"bench_{path.stem}_{plot.key}.png")
            if png is not None:
                images.append(png)
                parts.append(f"![{plot.caption}]({os.path.relpath(png, md_dir)})\n")
        picture = recorded_picture(results[path], img_dir)  # as recorded: a real path
        if picture is not None:
            parts.append(f"![{figure.name}]({os.path.relpath(picture, md_dir)})\n")
    return "\n".join(p for p in parts if p), images


def measured_when(path: Path) -> datetime:
    """When a result was made: its last commit's date (a fresh clone's files all carry the
    checkout's time), else, uncommitted, the file's modification time."""
    try:
        committed = subprocess.run(
            ["git", "log", "-1", "--format=%ct", "--", path.name],
            cwd=path.parent, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        committed = ""
    uncommitted = subprocess.run(
        ["git", "status", "--porcelain", "--", path.name], cwd=path.parent,
        capture_output=True, text=True,
    ).stdout.strip() if committed else ""  # fmt: skip
    stamp = int(committed) if committed and not uncommitted else path.stat().st_mtime
    return datetime.fromtimestamp(stamp, UTC)


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
        "Generated by `python -m bench.report` from `bench/results/*.json`; run everything with "
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
