"""Helpers for the importer tests: tiny images, files under tmp_path only, the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, colour=(200, 30, 30), size=(8, 6), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "index_builder.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def write_noise(path: Path, seed: int, size=(48, 32), fmt: str = "PNG") -> Path:
    """An image whose bytes differ with `seed` (noise does not compress away)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_truncated(path: Path, fmt: str = "PNG") -> Path:
    """A noise image cut to two thirds: its header still reads, its pixels do not."""
    data = write_noise(path, seed=999, size=(64, 48), fmt=fmt).read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path
