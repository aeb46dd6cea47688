"""The machine a benchmark ran on, as rates: speed figures are compared as ratios within one
run, and these say how fast the machine (and whatever shared it) was at the time."""

from __future__ import annotations

import os
import time

# Before faiss loads: passive OpenMP waits (the reason is in `index_builder.backends.recall`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

N, D = 4096, 256


def rates() -> dict[str, float]:
    """Float32 GEMM through numpy's BLAS (GFLOP/s) and exact nearest-centroid assignment
    through faiss, the kernel of IVF training and adding (billions of multiply-adds a
    second), with the threads faiss uses and the 1-minute load average (other work)."""
    a = np.random.default_rng(0).standard_normal((N, D), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((D, N), dtype=np.float32)
    a @ b  # warm up
    runs, started = 5, time.perf_counter()
    for _ in range(runs):
        a @ b
    gemm = 2 * N * N * D * runs / (time.perf_counter() - started)
    centroids = faiss.IndexFlatIP(D)
    centroids.add(np.ascontiguousarray(b.T))
    started = time.perf_counter()
    centroids.search(a, 1)
    assign = N * N * D / (time.perf_counter() - started)
    return {
        "gemm_gflops": round(gemm / 1e9, 1),
        "faiss_assign_gmacs": round(assign / 1e9, 1),
        "faiss_threads": faiss.omp_get_max_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
