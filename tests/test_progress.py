"""index_builder.progress: a bar on a terminal, plain log lines (count, rate, time left) in a
log; the project's only progress helper."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from PIL import Image
from tqdm import tqdm

from index_builder import progress as progress_module
from index_builder.progress import LogProgress, clock, progress

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clock_ticks(monkeypatch):
    """time.monotonic advancing 5 s per call after the first."""
    now = [1000.0]

    def tick():
        now[0] += 5.0
        return now[0]

    monkeypatch.setattr(progress_module.time, "monotonic", tick)


def test_a_log_gets_lines_with_count_rate_and_time_left(caplog, clock_ticks):
    caplog.set_level(logging.INFO, "index_builder.progress")
    items = list(progress(range(12), "gallery", every=15))  # not a terminal under pytest
    assert items == list(range(12))
    lines = [r.getMessage() for r in caplog.records]
    # 5 s per item: a line at 15 s, 30 s, ... and a last one with the total
    assert lines[0] == "gallery: 3/12 items (25%), 0.2 items/s, 0:45 left"
    assert len(lines) == 5 and lines[-1] == "gallery: 12 items in 1:05 (0.2 items/s)"


def test_counter_form_with_postfix_and_without_total(caplog, clock_ticks):
    caplog.set_level(logging.INFO, "index_builder.progress")
    with progress(desc="train", unit="step", initial=10, every=0) as bar:
        bar.update(2)
        bar.set_postfix(loss="0.5")
        bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "train: 12 steps, 0.4 steps/s, 0:05 so far",
        "train: 13 steps, 0.3 steps/s, 0:10 so far, loss 0.5",
        "train: 13 steps in 0:15 (0.2 steps/s)",
    ]


def test_a_short_loop_logs_nothing(caplog):
    caplog.set_level(logging.INFO, "index_builder.progress")
    assert sum(progress(range(100), "quick")) == 4950
    assert caplog.records == []


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(progress_module, "interactive", lambda: True)
    bar = progress(range(3), "x")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    monkeypatch.setattr(progress_module, "interactive", lambda: False)
    assert isinstance(progress(range(3), "x"), LogProgress)
    assert isinstance(progress(range(3), "x", disable=True), tqdm)  # silent: not the main rank


def test_an_import_reports_progress_in_a_log(tmp_path, monkeypatch, caplog):
    """The gallery stage: a folder import run with its output in a log says how far it is."""
    from index_builder.cli import main

    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"photo {i}\n")
    caplog.set_level(logging.INFO, "index_builder.progress")
    assert main(["data", "folder", str(photos), "--out", str(tmp_path / "ds")]) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        re.match(r"folder: 1/3 items \(33%\), [\d.]+ items/s, 0:\d\d left", x) for x in lines
    )
    assert lines[-1].startswith("folder: 3 items in")


def test_clock():
    assert (clock(5), clock(65), clock(3725)) == ("0:05", "1:05", "1:02:05")


def test_only_the_helper_makes_progress_bars():
    """Every long loop goes through index_builder.progress, so every one reports in a log."""
    users = [
        path.relative_to(ROOT).as_posix()
        for package in ("index_builder", "training", "service")
        for path in (ROOT / package).rglob("*.py")
        if re.search(r"^\s*(from tqdm|import tqdm)", path.read_text(), re.M)
    ]
    assert users == ["index_builder/progress.py"]
