"""`cots data ...`: build a gallery directory from a source."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "data",
        help="build a gallery (manifest + images) from a source",
        description="Build a gallery directory (manifest.jsonl, dataset.json, images/).",
    )
    parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
