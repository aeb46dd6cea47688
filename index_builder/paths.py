"""Where the pipeline keeps its artifacts by default: under $COTS_HOME (default ./cots-data)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("COTS_HOME", "cots-data"))


def dataset_dir(name: str) -> Path:
    return home() / "datasets" / name


def run_dir(name: str) -> Path:
    return home() / "runs" / name


def bundle_dir(name: str) -> Path:
    return home() / "bundles" / name


def index_root(name: str) -> Path:
    return home() / "indexes" / name


def named_path(word: str) -> tuple[str, Path]:
    """NAME=PATH, or a bare PATH named after its last component."""
    name, sep, path = word.partition("=")
    if not sep:
        return Path(word).name or word, Path(word)
    if not name or not path:
        raise ValueError(f"expected NAME=PATH, got {word!r}")
    return name, Path(path)
