"""What the semantic branch costs at encoding time: image throughput of the exported image
encoder with and without it, from the same towers, timed alternately in one run.

    python -m bench.semantic_cost --threads 2

Both bundles are step-0 exports of the `cots-cpu` recipe (the same EfficientNet-Lite0 and
MiniLM weights): one as the recipe is, one without the branch (`semantic_classes=null`).
Random pixels, the towers alone (no decoding). The ratio is what to read: absolute speed
differs between machines of the same kind; the load average is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from index_builder.atomic import atomic_write_json
from index_builder.bundle import Bundle
from index_builder.encoders import ImageEncoder
from training.export import export_bundle, step_zero_checkpoint

RESULTS = Path(__file__).parent / "results"


def images_per_s(encoder: ImageEncoder, pixels: np.ndarray) -> float:
    start = time.perf_counter()
    encoder.encode_pixels(pixels)
    return len(pixels) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--images", type=int, default=256, help="images per timed pass")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed passes each")
    args = parser.parse_args()
    variants = {"with branch": [], "without branch": ["model.options.semantic_classes=null"]}
    encoders = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sets in variants.items():
            checkpoint = step_zero_checkpoint("cots-cpu", sets)
            out = Path(tmp) / name.replace(" ", "-")
            export_bundle(checkpoint, out)
            encoders[name] = ImageEncoder(Bundle.load(out), threads=args.threads, batch_size=64)
        size = next(iter(encoders.values())).spec.size
        rng = np.random.default_rng(0)
        pixels = rng.standard_normal((args.images, 3, size, size), np.float32)
        rates: dict[str, list[float]] = {name: [] for name in encoders}
        load_before = os.getloadavg()[0]
        for encoder in encoders.values():
            images_per_s(encoder, pixels[:64])  # warm-up
        for _ in range(args.rounds):
            for name, encoder in encoders.items():
                rates[name].append(images_per_s(encoder, pixels))
    best = {name: max(r) for name, r in rates.items()}
    report = {
        "command": shlex.join(["python", "-m", "bench.semantic_cost", *sys.argv[1:]]),
        "threads": args.threads,
        "image_size": int(size),
        "images_per_s": {name: round(v, 1) for name, v in best.items()},
        "all_passes": {name: [round(v, 1) for v in r] for name, r in rates.items()},
        "ratio_with_to_without": round(best["with branch"] / best["without branch"], 3),
        "load_average_1m": [load_before, os.getloadavg()[0]],
        "cpus": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "semantic_cost.json", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
