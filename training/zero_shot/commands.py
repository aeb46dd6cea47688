"""`cots eval-zero-shot`: score exported bundles on collections they never trained on."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from index_builder.paths import named_path

DEFAULT_SUITES = ("fashion-mnist", "skimage", "photos")


def register(sub: argparse._SubParsersAction) -> None:
    from training.zero_shot.suites import KINDS

    parser = sub.add_parser(
        "eval-zero-shot",
        help="score exported bundles (ONNX, no torch) on collections they never trained on",
        description="Zero-shot retrieval and classification of one or more bundles: "
        "fashion-mnist (zero-shot classification and text-to-image mAP; Debian package "
        "dataset-fashion-mnist), skimage (scikit-image's photographs with written captions, "
        "R@1/5 both ways), photos (a folder of packaged photographs searched by text queries "
        "with known answers) and gallery (any `cots data` dataset, R@1/5/10 both ways). "
        "Writes OUT/zero_shot.json, zero_shot.md and zero_shot.png.",
    )
    parser.add_argument(
        "--bundle",
        dest="bundles",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a bundle directory to score, named in the report (repeatable); "
        "a bare PATH is named after its folder",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the report")
    parser.add_argument(
        "--suites",
        nargs="+",
        choices=KINDS,
        default=None,
        metavar="SUITE",
        help=f"suites to run, of {', '.join(KINDS)} (default: {' '.join(DEFAULT_SUITES)}, "
        "plus gallery when --data is given)",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a dataset directory for the gallery suite (repeatable), e.g. a built-in "
        "gallery held out of training",
    )
    parser.add_argument(
        "--split",
        default="all",
        choices=("train", "val", "test", "all"),
        help="split of each --data dataset to score (default: every record)",
    )
    parser.add_argument(
        "--per-class",
        type=int,
        default=100,
        help="Fashion-MNIST test images per class (the first ones in file order; default 100)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="ONNX Runtime threads (default: its choice)"
    )
    parser.set_defaults(func=_eval_zero_shot)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, spelled out with every option."""
    words = ["cots", "eval-zero-shot"]
    for bundle in args.bundles:
        words += ["--bundle", bundle]
    words += ["--out", str(args.out), "--suites", *args.suites]
    for data in args.data:
        words += ["--data", data]
    words += ["--split", args.split, "--per-class", str(args.per_class)]
    return shlex.join(words)


def _eval_zero_shot(args: argparse.Namespace) -> int:
    from training.zero_shot import build_suites, evaluate_bundles, load_bundles
    from training.zero_shot.report import write_report

    if args.suites is None:
        args.suites = [*DEFAULT_SUITES, *(["gallery"] if args.data else [])]
    bundles = load_bundles([named_path(word) for word in args.bundles])
    data = [named_path(word) for word in args.data]
    suites = build_suites(args.suites, data, args.split, args.per_class)  # fails before work
    report = {"command": command_line(args), **evaluate_bundles(bundles, suites, args.threads)}
    for path in write_report(args.out, report, suites):
        print(path)
    return 0
