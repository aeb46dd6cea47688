"""`cots index ...`: embed a gallery with a bundle and build versioned FAISS indexes."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("index", help="build FAISS indexes (not yet available)")
