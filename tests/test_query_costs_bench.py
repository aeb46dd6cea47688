"""bench/query_costs.py on a tiny gallery: each code layout built, tuned, served and timed."""

from __future__ import annotations

import numpy as np

from bench import query_costs as bench
from index_builder.backends.recall import exact_knn


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_each_layout_is_tuned_served_and_timed(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 16))

    def items(n):
        return _unit(centres[rng.integers(0, 20, n)] + 0.4 * rng.standard_normal((n, 16)))

    np.save(tmp_path / "i.npy", items(4000))
    images = np.load(tmp_path / "i.npy", mmap_mode="r")
    captions = items(4000)
    queries = _unit(items(60) + 0.3 * rng.standard_normal((60, 16)))
    truth = exact_knn(queries, [images], bench.K)
    for code, depth in (("SQ8", 2), ("PQ16x4fs", 16)):
        out = bench.layout(f"IVF32,{code}", images, captions, queries, truth, timed=5)
        assert out["params"]["rerank"] == depth
        assert out["tuned_recall"] >= 0.97 and out["served_recall"] >= 0.9
        times = ("lone_ms_1_thread", "lone_ms_2_threads", "batch_8_ms_a_query")
        assert all(out[name] > 0 for name in times)
