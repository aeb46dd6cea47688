"""Gallery embedding end to end on this CPU: images/s with decoding included, captions/s,
through the embedding stage `cots index build` runs (index_builder.embed.ShardEmbedder),
per setting of lanes x ONNX Runtime threads x batch size.

    python -m bench.embed_gallery --bundle BUNDLE --data DATASET [--repeats 3]

Also times the parts alone (decode + preprocess, ONNX Runtime on decoded pixels) in CPU
milliseconds per image, which another process's load changes far less than wall time, and
records the load average: on a shared 2-core host, wall figures are only as good as the
quietest of the repeats.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.figure import Figure, note
from index_builder import embed
from index_builder.atomic import atomic_write_json
from index_builder.bundle import Bundle
from index_builder.encoders import ImageEncoder
from index_builder.preprocess import load_image, preprocess_images
from index_builder.sources import dataset_rows

RESULTS = Path(__file__).parent / "results"
SETTINGS = ("auto", "2x1x64", "1x2x64")  # lanes x threads x batch; auto: 2x1x16 here


def parse_setting(text: str, batch: int) -> tuple[int, int, int]:
    """'auto' (what `cots index build` picks here, at `batch`) or LANESxTHREADSxBATCH."""
    if text == "auto":
        return (*embed.local_lanes(None), batch)
    lanes, threads, size = (int(part) for part in text.split("x"))
    return lanes, threads, size


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def measure(fn: Callable[[], int], repeats: int) -> dict[str, Any]:
    """Wall items/s (best and median of `repeats`) and CPU ms per item (this process)."""
    rates, cpu_ms, loads = [], [], []
    for _ in range(repeats):
        loads.append(load_average())
        wall, cpu = time.perf_counter(), time.process_time()
        items = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rates.append(items / wall)
        cpu_ms.append(1e3 * cpu / items)
    return {
        "per_s_best": round(max(rates), 1),
        "per_s_median": round(statistics.median(rates), 1),
        "cpu_ms_per_item": round(min(cpu_ms), 2),
        "load_average_1m": loads,
    }


def embed_side(work: Path, bundle: Bundle, side: str, setting: tuple[int, int, int]) -> int:
    lanes, threads, batch = setting
    embedder = embed.ShardEmbedder(work, bundle.path, side, threads, batch, lanes)
    shards = embed.shard_paths(work, side)
    return sum(embedder.embed_shard(i) for i in range(len(shards)))


def parts(bundle: Bundle, paths: list[str], repeats: int) -> dict[str, Any]:
    """Decode + preprocess alone, and one-thread ONNX Runtime on decoded pixels alone."""
    spec = bundle.image_spec

    def decode() -> int:
        for i in range(0, len(paths), 64):
            preprocess_images([load_image(p, spec.background) for p in paths[i : i + 64]], spec)
        return len(paths)

    pixels = preprocess_images([load_image(p, spec.background) for p in paths], spec)
    rows: dict[str, Any] = {"decode_preprocess": measure(decode, repeats)}
    for batch in (16, 64):
        encoder = ImageEncoder(bundle, threads=1, batch_size=batch)
        encoder.encode_pixels(pixels[:batch])  # warm-up
        rows[f"onnxruntime_1_thread_batch_{batch}"] = measure(
            lambda e=encoder: len(e.encode_pixels(pixels)), repeats
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    parser.add_argument("--data", type=Path, required=True, help="gallery dataset directory")
    parser.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per setting")
    parser.add_argument("--batch-size", type=int, default=16, help="batch of the auto setting")
    parser.add_argument(
        "--setting", action="append", help=f"LANESxTHREADSxBATCH or auto (default {SETTINGS})"
    )
    parser.add_argument("--captions", action="store_true", help="also time the caption side")
    parser.add_argument("--out", type=Path, default=RESULTS / "embed_gallery_cpu.json")
    args = parser.parse_args(argv)

    bundle = Bundle.load(args.bundle)
    rows = dataset_rows(args.data, None)
    if args.limit:
        kept = {row["id"] for row in rows["image"][: args.limit]}
        rows = {
            "image": rows["image"][: args.limit],
            "text": [row for row in rows["text"] if row["image_id"] in kept],
        }
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "bundle": {"id": bundle.bundle_id, "image_size": bundle.image_spec.size},
        "images": len(rows["image"]),
        "captions": len(rows["text"]),
        "command": shlex.join(["python", "-m", "bench.embed_gallery", *sys.argv[1:]]),
        "settings": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        embed.prepare(work, bundle, rows, shard_size=4096)
        for text in args.setting or SETTINGS:
            setting = parse_setting(text, args.batch_size)
            row = {"setting": text, "lanes_threads_batch": list(setting)}
            row["images"] = measure(
                lambda s=setting: embed_side(work, bundle, "image", s), args.repeats
            )
            if args.captions:
                row["captions"] = measure(
                    lambda s=setting: embed_side(work, bundle, "text", s), args.repeats
                )
            print(row, flush=True)
            report["settings"].append(row)
            atomic_write_json(args.out, report)
    report["parts"] = parts(bundle, [r["image"] for r in rows["image"][:512]], args.repeats)
    print(report["parts"], flush=True)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


FIGURE = Figure(
    "Gallery embedding on CPU, end to end",
    "embed_gallery*.json",
    "python -m bench.embed_gallery --bundle BUNDLE --data cots-data/datasets/openclipart",
    note=note("embed_gallery"),
)


if __name__ == "__main__":
    sys.exit(main())
