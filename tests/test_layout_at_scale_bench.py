"""bench/layout_at_scale.py on a tiny gallery: every layout swept, tuned and timed."""

from __future__ import annotations

import numpy as np

from bench import layout_at_scale as bench


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_a_layout_is_swept_tuned_and_timed(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 16))
    np.save(
        tmp_path / "v.npy",
        _unit(centres[rng.integers(0, 20, 3000)] + 0.4 * rng.standard_normal((3000, 16))),
    )
    base = np.load(tmp_path / "v.npy", mmap_mode="r")
    queries = _unit(base[:40] + 0.5 * rng.standard_normal((40, 16)))
    result, cases = bench.layout("IVF16,SQ8", base, queries, queries[::-1].copy())
    assert result["factory"] == "IVF16,SQ8" and result["points"]
    assert {p["rerank"] for p in result["points"]} == set(bench.DEPTHS["SQ8"])
    assert result["tuning"]["margin"]["aimed"] > result["tuning"]["plain"]["aimed"] == bench.GOAL
    assert len(cases) == len(bench.DEPTHS["SQ8"])  # the goal reached at every depth
    # each timed case is the smallest nprobe reaching the goal at its depth
    for case in cases:
        reached = [
            p["nprobe"]
            for p in result["points"]
            if p["rerank"] == case["rerank"] and p["recall"] >= bench.GOAL
        ]
        assert case["nprobe"] == min(reached)
    bench.timed(cases, queries[:3])
    assert all(
        case["scan_ms"] > 0 and case["pread_ms"] > 0 and case["mmap_ms"] > 0 for case in cases
    )
    grown = bench.resident_growth(base, 20)
    assert set(grown) == {
        f"{p}_{m}" for p in ("pread", "mmap") for m in ("rss_growth_mib", "ms_per_query")
    }
    assert grown["pread_rss_growth_mib"] < 1  # nothing mapped
    cold = bench.cold_rerank(base, (5,), 2)
    assert set(cold) == {"mmap_5_rows_ms", "pread_5_rows_ms"}
