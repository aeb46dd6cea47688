"""Embedding throughput (images/s, captions/s) of the torch-free encoders per bundle variant.

Exports a preset's towers (pretrained package weights where the preset names them) to fp32
and int8 bundles, then times ONNX Runtime through `index_builder.encoders` on this machine.

    python -m bench.embed_throughput --preset lite --threads 2

Random pixels, the towers alone: no decoding (bench/embed_gallery.py times that too). The
load average is recorded: with threads > 1, ONNX Runtime's spinning worker threads lose much
of their speed when another process takes a core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.figure import Figure
from bench.tables import flatten, generic, table
from index_builder.encoders import ImageEncoder, TextEncoder

RESULTS = Path(__file__).parent / "results"
WORDS = ["a", "the", "red", "blue", "green", "small", "dog", "cat", "car", "tree"]
WORDS += ["house", "on", "in", "near", "with"]


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(4, 14)))) for _ in range(n)]


def throughput(fn, items: int, repeats: int = 3) -> float:
    fn()  # warm-up (graph optimisation, allocator)
    best = min(_timed(fn) for _ in range(repeats))
    return items / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(bundle, args: argparse.Namespace, texts: list[str]) -> dict:
    size = bundle.image_spec.size
    pixels = np.random.default_rng(0).standard_normal((args.images, 3, size, size), np.float32)
    image = ImageEncoder(bundle, threads=args.threads, batch_size=args.batch_size)
    text = TextEncoder(bundle, threads=args.threads, batch_size=args.batch_size)
    return {
        "images_per_s": round(throughput(lambda: image.encode_pixels(pixels), args.images), 1),
        "captions_per_s": round(throughput(lambda: text.encode(texts), len(texts)), 1),
        "image_onnx_mib": round(bundle.image_onnx.stat().st_size / 2**20, 1),
        "text_onnx_mib": round(bundle.text_onnx.stat().st_size / 2**20, 1),
        "parity_max_abs_error": bundle.info["parity"]["max_abs_error"],
        "retrieval_effect": bundle.info.get("retrieval_effect"),
        "providers": image.session.get_providers(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="lite", help="model preset to export (tiny, lite, base)"
    )
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--image-size", type=int, help="input resolution (default: the preset's)")
    parser.add_argument("--images", type=int, default=128, help="images per timed pass")
    parser.add_argument("--captions", type=int, default=1024, help="captions per timed pass")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/...)")
    args = parser.parse_args()

    import torch

    from training.checkpoint import save_checkpoint
    from training.export import export_bundle
    from training.model import ModelConfig, build_model, load_preset

    torch.manual_seed(0)
    config = load_preset(args.preset).to_dict()
    config["image_size"] = args.image_size or config["image_size"]
    report: dict = {"preset": args.preset, "threads": args.threads, "host": platform.machine()}
    report |= {"image_size": config["image_size"], "load_average_1m": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(ModelConfig.from_dict(config)).eval()
        save_checkpoint(Path(tmp) / "ckpt", model, {})
        texts = captions(args.captions)
        for variant in args.variants:
            bundle = export_bundle(Path(tmp) / "ckpt", Path(tmp) / variant, variant)
            row = measure(bundle, args, texts)
            report[variant] = row
            print(
                f"{args.preset} {variant}: {row['images_per_s']} images/s, "
                f"{row['captions_per_s']} captions/s, parity {row['parity_max_abs_error']}, "
                f"effect {row['retrieval_effect']}",
                flush=True,
            )
    out = Path(args.out or RESULTS / f"embed_throughput_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report["load_average_1m_after"] = os.getloadavg()[0]
    report["command"] = shlex.join(["python", "-m", "bench.embed_throughput", *sys.argv[1:]])
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def variant_tables(data: dict) -> str:
    """embed_throughput: the settings, then one row per bundle variant (fp32, int8, ...)."""
    variants = {k: v for k, v in data.items() if isinstance(v, dict) and "images_per_s" in v}
    rows = [{"variant": name, **flatten(row)} for name, row in variants.items()]
    rest = generic({k: v for k, v in data.items() if k not in variants})
    return f"{rest}\n\n{table(rows)}" if rows else rest


FIGURE = Figure(
    "Embedding throughput per bundle variant",
    "embed_throughput*.json",
    "python -m bench.embed_throughput",
    render=variant_tables,
)


if __name__ == "__main__":
    main()
