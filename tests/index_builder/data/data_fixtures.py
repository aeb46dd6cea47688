"""Helpers for the importer tests: tiny images, files under tmp_path only, the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
