"""bench/scale_curve.py: its synthetic rows, the figures it takes from a service_load result
and the goals it checks on the curve."""

from __future__ import annotations

import numpy as np
import pytest

from bench import scale_curve
from bench.service_assets import Queries


def test_rows_are_made_on_demand_as_service_load_names_them():
    images, texts = scale_curve.Rows("image", 3), scale_curve.Rows("text", 3, start=10)
    assert len(images) == 3 and list(images)[2]["id"] == "syn0000002"
    assert images[-1] == images[2] and images[1:] == list(images)[1:]
    caption = {"id": "syn0000010#0", "image_id": "syn0000010", "text": "synthetic caption 10"}
    assert texts[0] == caption
    with pytest.raises(IndexError):
        images[3]
    queries = Queries([], [], text_truth=np.array([[0, 1, 2]]))
    served = [(0, [images[0]["id"], images[2]["id"], "syn0000009"])]
    assert queries.recall("/search/text-to-image", served) == pytest.approx(2 / 3, abs=1e-4)


def _served(p50, rps, rss):
    def endpoint(concurrency):
        return {"concurrency": concurrency, "p50_ms": p50, "throughput_rps": rps, "p99_ms": 50,
                "recall_at_10": 0.96}  # fmt: skip

    ways = ("text-to-image", "image-to-text")
    return {
        "endpoints": {f"/search/{w}": [endpoint(1), endpoint(16)] for w in ways},
        "floor_in_process": {w: {"p50_ms": p50 / 1.2} for w in ways},
        "server_memory_bytes": {"VmRSS": rss, "VmHWM": rss, "RssAnon": rss // 2},
    }


def _row(size, p50, rps, rss, build):
    side = {"factory": "IVF", "build_seconds": build}
    info = {"embed_dim": 256, "sides": {"image": side, "text": side}}
    row = scale_curve.figures(size, info, _served(p50, rps, rss))
    row.update(disk_bytes=int(1.3 * row["raw_vectors_bytes"]), disk_over_raw=1.3, load_seconds=9)
    return row


def test_goals_compare_the_largest_size_with_1m():
    small = _row(1_000_000, 4.0, 500, 1 << 30, 30)
    big = _row(10_000_000, 5.0, 300, 6 << 30, 400)  # 1.25x p50, 0.6x req/s, 13x build
    met = {g["goal"]: g["met"] for g in scale_curve.goals([small, big])}
    assert met["10000000 / 1M t2i_p50_ms <= 1.5"]
    assert not met["10000000 / 1M t2i_rps_16 >= 0.7"]
    assert not met["10000000 / 1M image_build_seconds <= 10"]
    assert met["10000000: service RSS / raw vectors <= 0.35"]  # 6 GiB of 20.5 GB raw
    assert met["1000000: t2i HTTP p50 / floor <= 1.3"] and met["10000000: i2t recall@10 >= 0.95"]
    lines = scale_curve.table([small, big]).splitlines()
    assert len(lines) == 4 and lines[3].startswith("| 10000000 | IVF | 0.96 |")


def test_the_report_section_renders_the_curve(tmp_path):
    rows = [_row(1_000_000, 4.0, 500, 1 << 30, 30), _row(3_000_000, 4.5, 450, 2 << 30, 90)]
    data = {"calibration": {"gemm_gflops": 35.3}, "rows": rows, "goals": scale_curve.goals(rows)}
    text = scale_curve.render(data)
    assert "gemm_gflops 35.3" in text and "| 3000000 | IVF |" in text
    assert "3000000 / 1M t2i_p50_ms <= 1.5" in text
    assert scale_curve.plot_curve(data, tmp_path / "cost.png").is_file()
    assert scale_curve.plot_curve({}, tmp_path / "none.png") is None
