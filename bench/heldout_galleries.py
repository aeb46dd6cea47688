"""Each built-in gallery held out in turn: train a recipe on the others (merged), score it
on the held-out one (recall@1/5/10 both ways, RSUM), beside the recipe's step-0 model.

    python -m bench.heldout_galleries --recipe cots-cpu --recipe clip-cpu \\
        --work cots-data/bench/heldout

The galleries are $COTS_HOME/datasets/{openclipart,emoji,synthetic} (`cots data ...`);
Open Clip Art is scored on its test split, the others whole. Writes
bench/results/heldout_galleries.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from index_builder import paths
from index_builder.atomic import atomic_write_json, atomic_write_text
from index_builder.cli import main as cots

RESULTS = Path(__file__).parent / "results"
GALLERIES = {"openclipart": "test", "emoji": "all", "synthetic": "all"}


def score(checkpoint: Path, gallery: str, out: Path) -> dict:
    split = GALLERIES[gallery]
    data = str(paths.dataset_dir(gallery))
    args = ["eval", "--checkpoint", str(checkpoint), "--data", data, "--split", split]
    if cots([*args, "--out", str(out)]):
        raise SystemExit(f"eval of {checkpoint} on {gallery} failed")
    metrics = json.loads(out.read_text())
    return {k: round(metrics[k], 1) for k in ("i2t_r1", "t2i_r1", "rsum")}


def train_without(recipe: str, held: str, work: Path) -> Path:
    others = [g for g in GALLERIES if g != held]
    merged = work / "data" / f"without-{held}"
    named = [f"{g}={paths.dataset_dir(g)}" for g in others]
    if cots(["data", "merge", *named, "--out", str(merged)]):
        raise SystemExit(f"merge of {others} failed")
    run = work / "runs" / f"{recipe}-without-{held}"
    done = (run / "checkpoints" / "best").is_dir()
    if not done and cots(["train", recipe, "--data", str(merged), "--out", str(run)]):
        raise SystemExit(f"training {recipe} without {held} failed")
    return run / "checkpoints" / "best"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", required=True, help="repeatable")
    parser.add_argument("--work", type=Path, required=True, help="merges, runs, metrics")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    for recipe in args.recipe:
        export = args.work / "step0" / recipe
        if cots(["export", "--recipe", recipe, "--out", str(export)]):
            return 1
        step0 = paths.run_dir(f"{recipe}-step0")
        for held in GALLERIES:
            metrics = args.work / "metrics"
            trained = score(train_without(recipe, held, args.work), held, metrics / "t.json")
            rows.append({"recipe": recipe, "held_out": held, "trained": trained,
                         "step0": score(step0, held, metrics / "s.json")})  # fmt: skip
    report = {
        "command": shlex.join(["python", "-m", "bench.heldout_galleries", *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - start, 1),
        "splits": GALLERIES,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "heldout_galleries.json", report)
    atomic_write_text(RESULTS / "heldout_galleries.md", render(report))
    print(render(report))
    return 0


def render(report: dict) -> str:
    lines = [f"`{report['command']}`", ""]
    lines += ["| recipe | held-out gallery | trained on the others: RSUM (t2i R@1) | "
              "step 0: RSUM (t2i R@1) |", "|---|---|---|---|"]  # fmt: skip
    for row in report["rows"]:
        t, s = row["trained"], row["step0"]
        lines.append(
            f"| {row['recipe']} | {row['held_out']} | {t['rsum']} ({t['t2i_r1']}) "
            f"| {s['rsum']} ({s['t2i_r1']}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
