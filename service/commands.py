"""`cots serve`: run the search API."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("serve", help="run the search service (not yet available)")
