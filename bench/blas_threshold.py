"""Exact inner-product search per query through FAISS's SIMD loop and through BLAS, by query
batch size, on one thread: where index_builder.backends.recall.BLAS_THRESHOLD (queries x
dimension) should switch. Two cases: an IVF coarse quantizer (4096 centroids, nprobe 128) and
a flat gallery of 100k (k=10), both 256-d.

    python -m bench.blas_threshold
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from bench.figure import Figure

OUT = Path(__file__).parent / "results/blas_threshold.json"
CASES = {
    "coarse quantizer: 4096 x 256, k=128": (4096, 128),
    "flat: 100000 x 256, k=10": (100_000, 10),
}


def per_query_ms(index: faiss.Index, queries: np.ndarray, k: int, threshold: int) -> float:
    faiss.cvar.distance_compute_blas_threshold = threshold
    index.search(queries, k)  # warm-up
    reps = max(3, 256 // len(queries))
    start = time.perf_counter()
    for _ in range(reps):
        index.search(queries, k)
    return round((time.perf_counter() - start) / reps / len(queries) * 1000, 4)


def main() -> int:
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((64, 256)).astype(np.float32)
    results = {}
    for name, (size, k) in CASES.items():
        index = faiss.IndexFlatIP(256)
        index.add(rng.standard_normal((size, 256)).astype(np.float32))
        rows = []
        for nq in (1, 2, 4, 8, 16, 32, 64):
            batch = queries[:nq]
            rows.append(
                {
                    "queries": nq,
                    "simd_ms_per_query": per_query_ms(index, batch, k, 1 << 30),
                    "blas_ms_per_query": per_query_ms(index, batch, k, 1),
                }
            )
            print(name, rows[-1], flush=True)
        results[name] = rows
    out = {
        "threads": 1,
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
        "results": results,
        "command": shlex.join(["python", "-m", "bench.blas_threshold", *sys.argv[1:]]),
    }
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


FIGURE = Figure(
    "FAISS exact search: SIMD loop or BLAS, by query batch",
    "blas_threshold*.json",
    "python -m bench.blas_threshold",
    note="index_builder.backends.recall.BLAS_THRESHOLD (queries x dimension) switches to BLAS "
    "from 4 queries at d=256: below that, BLAS costs up to 5x more per query.",
)


if __name__ == "__main__":
    sys.exit(main())
