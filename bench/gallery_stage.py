"""The gallery stage per image: `cots data openclipart` of this tree against an older revision.

    python -m bench.gallery_stage --limit 300 --workers 1 --repeats 2

Extracts index_builder/ at --rev (default: the last commit of 2026-11-28, the day the stage
took 2:26) with `git archive` into a temporary directory, then runs
`cots data openclipart --limit N --workers W` with each tree in turn, in its own process
(PYTHONPATH set to the tree, run from a scratch directory), alternating the order on each
repeat, into a fresh output directory, on the same SVGs. Reports wall and CPU (user + sys of
the child) seconds per image written (median over the repeats), the ratios, the load average
around every run, and whether both trees wrote the same manifest, dataset.json and images,
byte for byte. Writes bench/results/gallery_stage.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench.figure import command_line

ROOT = Path(__file__).resolve().parents[1]
DAY = "2026-11-29T00:00:00+00:00"  # commits before it are 2026-11-28's code


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=300, help="first N SVGs in path order")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tree")
    parser.add_argument(
        "--rev", default=None, help=f"the older revision (default: the last commit before {DAY})"
    )
    parser.add_argument("--root", default="/usr/share/openclipart/svg", help="the SVG folder")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench/results/gallery_stage.json", help="result"
    )
    return parser.parse_args()


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def extract(rev: str, into: Path) -> None:
    """index_builder/ as it was at `rev` (nothing is checked out or committed)."""
    archive = subprocess.run(
        ["git", "archive", rev, "index_builder"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def imported_from(tree: Path, scratch: Path) -> str:
    code = "import index_builder; print(index_builder.__file__)"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=scratch, env=env, check=True, capture_output=True
    )
    return done.stdout.decode().strip()


def run_once(tree: Path, out: Path, args: argparse.Namespace, scratch: Path) -> dict:
    command = [sys.executable, "-m", "index_builder.cli", "data", "openclipart"]
    command += ["--root", args.root, "--limit", str(args.limit), "--workers", str(args.workers)]
    command += ["--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    load_before = os.getloadavg()[0]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=scratch, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the pool's workers
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    images = json.loads((out / "dataset.json").read_text())["count"]
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "images": images,
        "load_1m_before": round(load_before, 2),
        "load_1m_after": round(os.getloadavg()[0], 2),
    }


def same_output(a: Path, b: Path) -> dict[str, bool]:
    def files(root: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((root / "images").glob("*.png"))}

    return {
        "manifest": (a / "manifest.jsonl").read_bytes() == (b / "manifest.jsonl").read_bytes(),
        "dataset_json": (a / "dataset.json").read_bytes() == (b / "dataset.json").read_bytes(),
        "images": files(a) == files(b),
    }


def per_image(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] / run["images"] for run in runs)


def main() -> None:
    args = parse_args()
    rev = args.rev or git("rev-list", "-1", f"--before={DAY}", "HEAD")
    rev_line = git("log", "-1", "--format=%h %cI %s", rev)
    head_line = git("log", "-1", "--format=%h %cI %s", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "index_builder"))
    with tempfile.TemporaryDirectory(prefix="gallery-stage-") as tmp:
        scratch = Path(tmp)
        old = scratch / "old"
        extract(rev, old)
        trees = {"old": old, "new": ROOT}
        origins = {name: imported_from(tree, scratch) for name, tree in trees.items()}
        for name, tree in trees.items():
            assert origins[name].startswith(str(tree)), f"{name} imports {origins[name]}"
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for repeat in range(args.repeats):
            for name in ("old", "new") if repeat % 2 == 0 else ("new", "old"):
                out = scratch / f"{name}-{repeat}" / "openclipart"  # the name lands in dataset.json
                runs[name].append(run_once(trees[name], out, args, scratch))
                print(f"{name} run {repeat + 1}: {runs[name][-1]}", flush=True)
        identical = same_output(scratch / "old-0/openclipart", scratch / "new-0/openclipart")
    summary = {
        name: {
            "wall_s_per_image": round(per_image(r, "wall_s"), 4),
            "cpu_s_per_image": round(per_image(r, "cpu_s"), 4),
        }
        for name, r in runs.items()
    }
    ratio = {
        key: round(summary["new"][key] / summary["old"][key], 3)
        for key in ("wall_s_per_image", "cpu_s_per_image")
    }
    report = {
        "command": command_line("gallery_stage", sys.argv[1:]),
        "old": rev_line,
        "new": head_line + (" (with uncommitted changes)" if dirty else ""),
        "limit": args.limit,
        "workers": args.workers,
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "runs": runs,
        "per_image": summary,
        "ratio_new_over_old": ratio,
        "identical_output": identical,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name in ("old", "new"):
        s = summary[name]
        print(
            f"{name}: {s['wall_s_per_image'] * 1000:.1f} ms/image wall, "
            f"{s['cpu_s_per_image'] * 1000:.1f} ms/image CPU"
        )
    print(f"new/old: wall {ratio['wall_s_per_image']}, CPU {ratio['cpu_s_per_image']}")
    print(f"identical output: {identical}; load average {report['machine']['load_average_at_end']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
