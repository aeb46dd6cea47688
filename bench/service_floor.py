"""The floor of bench/service_load.py: one tower pass plus one index search per query, measured
in-process (no HTTP, no batching)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.service_assets import Queries
from bench.service_backend import Backend


def floor(
    bundle_dir: Path,
    index_root: Path,
    queries: Queries,
    k: int,
    reps: int,
    threads: int,
    backend: Backend,
) -> dict[str, Any]:
    """One tower pass plus one index search per query, no HTTP and no batching, on `threads`
    ONNX Runtime and FAISS threads (Milvus: a round trip to its server per search)."""
    import faiss

    from index_builder.bundle import Bundle
    from index_builder.encoders import ImageEncoder, TextEncoder
    from index_builder.preprocess import load_image, preprocess_images

    bundle = Bundle.load(bundle_dir)
    index = backend.store(index_root).open(bundle=bundle)
    text, image = TextEncoder(bundle, threads=threads), ImageEncoder(bundle, threads=threads)
    faiss.omp_set_num_threads(threads)

    def t2i(i: int) -> dict[str, float]:
        t0 = time.perf_counter()
        vector = text.encode([queries.texts[i % len(queries.texts)]])
        t1 = time.perf_counter()
        index.search("image", vector, k)
        return {"encode": t1 - t0, "search": time.perf_counter() - t1}

    def i2t(i: int) -> dict[str, float]:
        t0 = time.perf_counter()
        data = queries.images[i % len(queries.images)]
        pixels = preprocess_images(
            [load_image(data, bundle.image_spec.background)], bundle.image_spec
        )
        t1 = time.perf_counter()
        vector = image.encode_pixels(pixels)
        t2 = time.perf_counter()
        index.search("text", vector, k)
        return {"decode": t1 - t0, "encode": t2 - t1, "search": time.perf_counter() - t2}

    result: dict[str, Any] = {
        name: timed(fn, reps) for name, fn in (("text-to-image", t2i), ("image-to-text", i2t))
    }
    counts = {side: index.live_count(side) for side in index.sides}
    result["gallery"] = {"images": counts.get("image", 0), "captions": counts.get("text", 0)}
    result["index"] = served_index(index)
    result["raw_vectors_bytes"] = 4 * index.embed_dim * sum(counts.values())
    return result


def timed(fn: Callable[[int], dict[str, float]], reps: int) -> dict[str, Any]:
    """p50 and p99 of `reps` calls of fn (after 5 to warm up), and each stage's mean."""
    for i in range(5):
        fn(i)  # warm-up
    runs = [fn(i) for i in range(reps)]
    totals = np.asarray([sum(r.values()) for r in runs]) * 1000
    return {
        "p50_ms": round(float(np.percentile(totals, 50)), 3),
        "p99_ms": round(float(np.percentile(totals, 99)), 3),
        "stages_mean_ms": {
            s: round(float(np.mean([r[s] for r in runs])) * 1000, 3) for s in runs[0]
        },
    }


def served_index(index: Any) -> dict[str, Any]:
    """The version of an open index, and per side its factory, search setting, recall and
    build time as recorded at build."""
    sides = index.info["sides"]
    return {
        "version": index.version,
        "factories": {side: sides[side]["factory"] for side in ("image", "text")},
        "search_params": {side: sides[side]["search_params"] for side in ("image", "text")},
        "recall_at_10": {side: sides[side]["recall_at_10"] for side in ("image", "text")},
        "build_seconds": {side: sides[side]["build_seconds"] for side in ("image", "text")},
    }
