"""`cots train` and `cots eval`: registered lazily so that --help needs no torch."""

from __future__ import annotations

import argparse


def register_train(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("train", help="train the two towers (not yet available)")


def register_eval(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("eval", help="recall@K of a checkpoint (not yet available)")
