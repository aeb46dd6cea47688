"""Recipes judged on collections they never trained on, beside their in-domain quality.

For each run (a trained run directory, or a step-0 checkpoint), exports the best checkpoint
to a bundle (reused when current), scores every bundle with `cots eval-zero-shot` (Fashion-
MNIST, scikit-image's photos, the photo folder, and the built-in galleries given with
--heldout), and the in-domain test split with `cots eval`. Writes
bench/results/zero_shot_recipes.{json,md} (figures, the command, the machine) and the
suite's picture.

    python -m bench.zero_shot_recipes --work cots-data/bench/zero-shot \\
        --run cots-cpu=cots-data/runs/base --run step0=cots-data/runs/cots-cpu-step0 \\
        --in-domain cots-data/datasets/openclipart \\
        --heldout emoji=cots-data/datasets/emoji --heldout synthetic=cots-data/datasets/synthetic

A held-out gallery is zero-shot only for runs that did not train on it: `--trained-on`
names each run's training galleries in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from index_builder.atomic import atomic_write_json, atomic_write_text
from index_builder.cli import main as cots

RESULTS = Path(__file__).parent / "results"


def checkpoint_of(run: Path) -> Path:
    best = run / "checkpoints" / "best"
    return best if best.is_dir() else run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--work", type=Path, required=True, help="bundles and reports go here")
    parser.add_argument("--in-domain", type=Path, required=True, help="dataset; its test split")
    parser.add_argument("--heldout", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument(
        "--trained-on",
        action="append",
        default=[],
        metavar="NAME=TEXT",
        help="the galleries a run trained on, for the table (a held-out gallery is zero-shot "
        "only for runs that did not train on it)",
    )
    parser.add_argument("--name", default="zero_shot_recipes", help="results file stem")
    args = parser.parse_args(argv)
    runs = dict(word.split("=", 1) for word in args.run)
    start = time.perf_counter()
    bundles, in_domain = [], {}
    trained = {name: "-" for name in runs} | dict(w.split("=", 1) for w in args.trained_on)
    for name, run in runs.items():
        checkpoint = checkpoint_of(Path(run))
        bundle = args.work / "bundles" / name
        if cots(["export", "--checkpoint", str(checkpoint), "--out", str(bundle)]):
            return 1
        bundles += ["--bundle", f"{name}={bundle}"]
        metrics = args.work / "in_domain" / f"{name}.json"
        code = cots(["eval", "--checkpoint", str(checkpoint), "--data", str(args.in_domain),
                     "--split", "test", "--out", str(metrics)])  # fmt: skip
        if code:
            return code
        in_domain[name] = json.loads(metrics.read_text())
    suites = ["fashion-mnist", "skimage", "photos"] + (["gallery"] if args.heldout else [])
    report_dir = args.work / "report"
    data = [w for h in args.heldout for w in ("--data", h)]
    if cots(["eval-zero-shot", *bundles, "--out", str(report_dir), "--suites", *suites, *data]):
        return 1
    zero_shot = json.loads((report_dir / "zero_shot.json").read_text())
    result = {
        "command": shlex.join(["python", "-m", "bench.zero_shot_recipes", *(argv or sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seconds": round(time.perf_counter() - start, 1),
        "runs": runs,
        "order": list(runs),
        "trained_on": trained,
        "in_domain": {
            n: {k: m[k] for k in ("i2t_r1", "t2i_r1", "rsum")} for n, m in in_domain.items()
        },
        "zero_shot": zero_shot["results"],
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / f"{args.name}.json", result)
    atomic_write_text(RESULTS / f"{args.name}.md", render(result, report_dir))
    (RESULTS / f"{args.name}.png").write_bytes((report_dir / "zero_shot.png").read_bytes())
    print(render(result, report_dir))
    return 0


def render(result: dict, report_dir: Path) -> str:
    """One table: in-domain RSUM, then each zero-shot suite's headline per run."""
    lines = [f"`{result['command']}`", ""]
    suites = next(iter(result["zero_shot"].values()))
    head = ["run", "trained on", "in-domain RSUM"] + list(suites)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in result["order"]:
        scores = result["zero_shot"][name]
        cells = [name, result["trained_on"][name], f"{result['in_domain'][name]['rsum']:.1f}"]
        cells += [headline(scores[suite]) for suite in suites]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def headline(metrics: dict) -> str:
    if "r1_hits" in metrics:
        return f"{metrics['r1_hits']}/{metrics['queries']} (top 10: {metrics['r10_hits']})"
    key = "accuracy" if "accuracy" in metrics else "rsum"
    return f"{metrics[key]:.1f}"


if __name__ == "__main__":
    sys.exit(main())
