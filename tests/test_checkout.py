"""What a fresh clone holds: no symbolic link (a link to one machine's folder made `cots-data`
a dangling link on every other, and the main command failed at its first stage) and nothing
under the folders the pipeline writes."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WRITTEN = ("cots-data", "runs")  # $COTS_HOME's default and training's runs


def _tracked() -> list[tuple[str, str]]:
    """(mode, path) of every file git tracks in this checkout."""
    out = subprocess.run(
        ["git", "ls-files", "-s"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return [(line.split()[0], line.split("\t", 1)[1]) for line in out.splitlines()]


def test_the_repository_tracks_no_symbolic_link():
    assert [path for mode, path in _tracked() if mode == "120000"] == []


def test_nothing_the_pipeline_writes_is_tracked_or_left_unignored():
    tracked = [path for _, path in _tracked() if path.split("/")[0] in WRITTEN]
    assert tracked == []
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *WRITTEN], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert sorted(ignored) == sorted(WRITTEN)  # as a folder, a file or a link alike
