"""`cots export`: checkpoint -> ONNX bundle."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("export", help="export an ONNX bundle (not yet available)")
