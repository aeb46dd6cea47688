"""bench/soak.py: its per-minute arithmetic against numpy, and a few seconds of a real soak."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from bench import report, soak

ROOT = Path(__file__).resolve().parents[1]


def test_rows_per_bin_match_numpy():
    rng = np.random.default_rng(0)
    at = np.sort(rng.uniform(0, 120, 500))
    seconds = rng.exponential(0.02, 500)
    samples = [
        soak.Sample(float(t), float(s), "t2i", "200" if i % 50 else "500", bool(i % 50))
        for i, (t, s) in enumerate(zip(at, seconds, strict=True))
    ]
    memory = [(float(t), 100.0 + t) for t in range(120)]
    rows = soak.summarise(samples, memory, 120.0, 60.0)
    assert [row["minute"] for row in rows] == [1.0, 2.0]
    for row, lo in zip(rows, (0, 60), strict=True):
        mine = (at >= lo) & (at < lo + 60)
        assert row["requests"] == mine.sum()
        assert row["p99_ms"] == pytest.approx(np.percentile(seconds[mine] * 1000, 99), abs=0.01)
        assert row["rss_max_mb"] == 100.0 + lo + 59
        bad = [i for i in np.flatnonzero(mine) if i % 50 == 0]
        assert row["errors"] == len(bad) and row["unexpected"] == {"t2i:500": len(bad)}


@pytest.mark.slow
def test_a_short_soak_runs_clean(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the demo assets go here
    out = tmp_path / "soak.json"
    argv = ["--minutes", "0.05", "--bin-seconds", "1.5", "--demo-images", "40", "--out", str(out)]
    assert soak.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["requests"] > 20 and result["errors"] == 0
    assert len(result["minutes"]) == 2 and result["rss_start_mb"] > 0
    assert {"t2i", "i2t_multipart"} <= set(result["kinds"])


def test_the_report_has_a_soak_section_with_a_plot(tmp_path):
    row = {"requests": 100, "errors": 0, "p50_ms": 5.0, "p99_ms": 20.0, "rss_max_mb": 120.0}
    rows = [{"minute": minute, **row, "unexpected": {}} for minute in (1.0, 2.0)]
    results = tmp_path / "results"
    results.mkdir()
    data = {"command": "python -m bench.soak --minutes 2", "rss_start_mb": 110.0, "minutes": rows}
    (results / "soak.json").write_text(json.dumps(data))
    written = report.build_report(results, tmp_path / "benchmarks.md", tmp_path / "img")
    text = (tmp_path / "benchmarks.md").read_text()
    assert "## Service soak" in text and "Command: `python -m bench.soak --minutes 2`" in text
    assert "| minute | requests | errors | p50_ms | p99_ms | rss_max_mb |" in text
    assert "| rss_start_mb | 110 |" in text
    assert {p.name for p in written if p.suffix == ".png"} == {"bench_soak_soak.png"}
