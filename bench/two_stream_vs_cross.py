"""Ranking time of the two-stream model against a single-stream cross-encoder of similar size.

    python -m bench.two_stream_vs_cross                              # tiny and lite, CPU
    python -m bench.two_stream_vs_cross --presets lite --bundle DIR  # two-stream on ONNX Runtime

Two-stream (COTS): every gallery image goes once through the image tower, every query once
through the text tower, and one FAISS search (exact inner product, k=10) ranks the gallery.
Cross-encoder (VinVL/UNITER-style single stream): a BERT with the text tower's width and depth
runs over the joint sequence [CLS text ; image tokens] of every (query, image) pair and scores
it with a linear head on [CLS]. Its image tokens (the image tower's patches or last-stage
cells, projected to the joint width) are computed once per image, which is generous to it; the
joint transformer must run per pair. Weights are untrained: only time is measured.

Q x N pairs is far too many to run, so each cost is measured on a sample (images, captions,
pairs) and extrapolated linearly; the FAISS search runs at full size on random unit vectors
(exact search costs the same whatever the vectors). Both sides start from strings and
preprocessed pixels (no image decoding on either side).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

from index_builder.preprocess import TextTokenizer  # noqa: E402
from training.model import TwoTower, build_model, load_preset  # noqa: E402
from training.towers.bert import BertEmbeddings, BertLayer  # noqa: E402

PAPER_RATIO = 10_800  # COTS (CVPR 2022) against VinVL, stated in the abstract
SHAPES = {  # name -> (gallery images, text queries): the standard 1K/5K test splits
    "flickr30k-1k": (1_000, 5_000),
    "mscoco-5k": (5_000, 25_000),
}
VOCABULARY = """a man woman child dog cat two young people group red blue white black small large
standing sitting walking running playing holding wearing looking near front of on in the street
grass water beach table field shirt ball bike car building tree snow"""
WORDS = VOCABULARY.split()
CAPTION_WORDS = 12  # Flickr30K and MSCOCO captions average 10 to 12 words


class CrossEncoder(nn.Module):
    """Single-stream scorer: BERT layers over [CLS text ; image tokens] -> one score per pair.

    Image tokens enter as UNITER's image embedder does: a linear map of the visual features to
    the joint width, a segment (type) embedding and LayerNorm.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        intermediate: int,
        max_positions: int,
        image_width: int,
    ) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, width, max_positions)
        self.image_in = nn.Linear(image_width, width)
        self.image_type = nn.Parameter(torch.zeros(width))
        self.image_norm = nn.LayerNorm(width, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(width, heads, intermediate) for _ in range(layers))
        self.head = nn.Linear(width, 1)  # image-text matching score on [CLS]

    def image_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Visual features (B, N, V) -> joint-width image tokens (B, N, W), once per image."""
        return self.image_norm(self.image_in(features) + self.image_type)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """(P, L) ids and mask, (P, N, W) image tokens -> (P,) scores, one per pair."""
        x = torch.cat([self.embeddings(input_ids), image_tokens], dim=1)  # (P, L + N, W)
        keep = torch.cat([attention_mask, attention_mask.new_ones(image_tokens.shape[:2])], 1)
        bias = (1.0 - keep.float())[:, None, None, :] * torch.finfo(torch.float32).min
        for layer in self.layers:
            x = layer(x, bias)
        return self.head(x[:, 0]).squeeze(-1)


def build_cross_encoder(model: TwoTower) -> CrossEncoder:
    """A cross-encoder with the text tower's width, depth, heads and vocabulary."""
    cfg = model.config
    return CrossEncoder(
        vocab_size=model.text_tower.embeddings.word_embeddings.num_embeddings,
        width=cfg.text_width,
        layers=cfg.text_layers,
        heads=cfg.text_heads,
        intermediate=cfg.text_intermediate,
        max_positions=cfg.text_max_positions,
        image_width=model.image_tower.width,
    ).eval()


def captions(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, CAPTION_WORDS)) for _ in range(count)]


def pixels(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, size, size), dtype=np.float32)


# -- timing ------------------------------------------------------------------------------------


def seconds_per_item(fn: Callable[[Sequence], Any], items: Sequence, batch_size: int) -> float:
    """Wall time per item of `fn` over `items` in batches, after one untimed warm-up batch."""
    fn(items[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(items), batch_size):
        fn(items[i : i + batch_size])
    return (time.perf_counter() - start) / len(items)


def median_seconds(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of `fn()` over `reps` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class TorchTowers:
    """The two-stream side on torch: strings / pixels -> unit vectors."""

    backend = "torch"

    def __init__(self, model: TwoTower) -> None:
        self.model = model
        self.image_size, self.embed_dim = model.image_spec.size, model.config.embed_dim
        self.tokenizer = TextTokenizer(model.tokenizer_json, model.text_spec.context_length)

    @torch.inference_mode()
    def images(self, batch: np.ndarray) -> np.ndarray:
        return self.model.encode_image(torch.from_numpy(batch)).numpy()

    @torch.inference_mode()
    def texts(self, batch: Sequence[str]) -> np.ndarray:
        ids, mask = self.tokenizer(list(batch))
        return self.model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


class OnnxTowers:
    """The two-stream side on a bundle's ONNX graphs (index_builder.encoders)."""

    backend = "onnxruntime"

    def __init__(self, bundle_dir: Path, threads: int) -> None:
        from index_builder.bundle import Bundle
        from index_builder.encoders import ImageEncoder, TextEncoder

        bundle = Bundle.load(bundle_dir)
        self.image_size, self.embed_dim = bundle.image_spec.size, bundle.embed_dim
        self.image = ImageEncoder(bundle, threads=threads)
        self.text = TextEncoder(bundle, threads=threads)

    def images(self, batch: np.ndarray) -> np.ndarray:
        return self.image.encode_pixels(batch)

    def texts(self, batch: Sequence[str]) -> np.ndarray:
        return self.text.encode(batch)


def time_two_stream(towers: Any, args: argparse.Namespace) -> dict[str, float]:
    """Per-item encoding costs of the two towers and the single-query text latency."""
    texts = captions(args.sample_texts, seed=1)
    images = pixels(args.sample_images, towers.image_size)
    return {
        "image_s": seconds_per_item(towers.images, images, args.batch),
        "text_s": seconds_per_item(towers.texts, texts, args.text_batch),
        "text_query_s": median_seconds(lambda: towers.texts(texts[:1]), args.reps),
    }


@torch.inference_mode()
def time_cross(
    model: TwoTower, cross: CrossEncoder, args: argparse.Namespace
) -> dict[str, float | int]:
    """Per-image feature cost, per-query tokenisation cost and per-pair cost of the cross side."""
    tokenizer = TextTokenizer(model.tokenizer_json, model.text_spec.context_length)
    images = torch.from_numpy(pixels(args.sample_images, model.image_spec.size))

    def features(batch: torch.Tensor) -> torch.Tensor:
        return cross.image_tokens(model.image_features(batch)["tokens"])  # (B, N, W)

    image_s = seconds_per_item(features, images, args.batch)
    texts = captions(args.pair_batch, seed=2)
    tokenize_s = seconds_per_item(tokenizer, texts, args.pair_batch)
    # A sample of pairs: pair_batch queries against pair_batch gallery images (one pair each).
    ids, mask = (torch.from_numpy(a) for a in tokenizer(texts))
    tokens = features(images[: min(len(images), args.pair_batch)])
    tokens = tokens[torch.arange(args.pair_batch) % len(tokens)]  # (P, N, W)
    batch_s = median_seconds(lambda: cross(ids, mask, tokens), args.reps)
    return {
        "image_s": image_s,
        "tokenize_s": tokenize_s,
        "pair_s": batch_s / args.pair_batch,
        "text_tokens": int(ids.shape[1]),
        "image_tokens": int(tokens.shape[1]),
    }


def time_search(dim: int, images: int, queries: int, k: int, reps: int) -> dict[str, float]:
    """Exact FAISS inner-product search at full size: build, all queries, one query."""
    import faiss

    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((images, dim), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    query = rng.standard_normal((queries, dim), dtype=np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    start = time.perf_counter()
    index = faiss.IndexFlatIP(dim)
    index.add(gallery)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    index.search(query, k)
    all_s = time.perf_counter() - start
    one_s = median_seconds(lambda: index.search(query[:1], k), reps)
    return {"build_s": build_s, "all_queries_s": all_s, "query_s": one_s}


def extrapolate(
    two: dict[str, float],
    cross: dict[str, Any],
    search: dict[str, float],
    images: int,
    queries: int,
) -> dict[str, Any]:
    """Full ranking time and per-query latency of both sides for a gallery x query shape.

    two-stream: N image passes + Q text passes + index build + one batched search;
    per query: one text pass + one single-query search.
    cross: N image feature passes + Q tokenisations + Q x N joint passes;
    per query: one tokenisation + N joint passes (image tokens cached offline).
    """
    two_full = images * two["image_s"] + queries * two["text_s"]
    two_full += search["build_s"] + search["all_queries_s"]
    cross_full = images * cross["image_s"] + queries * cross["tokenize_s"]
    cross_full += queries * images * cross["pair_s"]
    two_query = two["text_query_s"] + search["query_s"]
    cross_query = cross["tokenize_s"] + images * cross["pair_s"]
    return {
        "images": images,
        "queries": queries,
        "pairs": images * queries,
        "two_stream_s": two_full,
        "cross_encoder_s": cross_full,
        "ratio": cross_full / two_full,
        "two_stream_query_ms": 1000 * two_query,
        "cross_encoder_query_ms": 1000 * cross_query,
        "query_ratio": cross_query / two_query,
        "two_stream_passes": images + queries,
    }


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def compare(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Both sides of one preset at every shape in `args.shapes`."""
    torch.manual_seed(0)
    model = build_model(load_preset(preset), load_weights=False).eval()
    cross = build_cross_encoder(model)
    towers = OnnxTowers(args.bundle, args.threads) if args.bundle else TorchTowers(model)
    two = time_two_stream(towers, args)
    cross_times = time_cross(model, cross, args)
    shapes = {}
    for name, (images, queries) in args.shapes.items():
        search = time_search(towers.embed_dim, images, queries, args.k, args.reps)
        shapes[name] = {**extrapolate(two, cross_times, search, images, queries), "search": search}
    cfg = model.config
    return {
        "preset": preset,
        "backend": towers.backend,
        "bundle": str(args.bundle) if args.bundle else None,
        "two_stream": {
            **({} if args.bundle else {"params": params(model), "image_tower": cfg.image_tower}),
            "image_size": towers.image_size,
            "embed_dim": towers.embed_dim,
            **two,
        },
        "cross_encoder": {
            "params": params(cross),
            "params_with_image_tower": params(cross) + params(model.image_tower),
            "layers": cfg.text_layers,
            "width": cfg.text_width,
            **cross_times,
        },
        "shapes": shapes,
    }


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def print_result(row: dict[str, Any]) -> None:
    two, cross = row["two_stream"], row["cross_encoder"]
    print(
        f"[{row['preset']}] two-stream ({row['backend']}): {1000 * two['image_s']:.2f} ms/image, "
        f"{1000 * two['text_s']:.3f} ms/caption; cross-encoder ({cross['layers']} layers x "
        f"{cross['width']}, {cross['text_tokens']}+{cross['image_tokens']} tokens): "
        f"{1000 * cross['pair_s']:.3f} ms/pair"
    )
    for name, shape in row["shapes"].items():
        print(
            f"  {name} ({shape['images']:,} images x {shape['queries']:,} queries): "
            f"two-stream {shape['two_stream_s']:,.1f} s, cross-encoder "
            f"{shape['cross_encoder_s']:,.0f} s (extrapolated), ratio {shape['ratio']:,.0f}x; "
            f"per query {shape['two_stream_query_ms']:.2f} ms vs "
            f"{shape['cross_encoder_query_ms']:,.0f} ms, ratio {shape['query_ratio']:,.0f}x"
        )


def parse_shapes(text: str) -> dict[str, tuple[int, int]]:
    """`name=NxQ,...` or names from SHAPES."""
    shapes = {}
    for item in filter(None, text.split(",")):
        name, _, dims = item.partition("=")
        if not dims:
            if name not in SHAPES:
                raise ValueError(f"unknown shape {name!r} (known: {', '.join(SHAPES)})")
            shapes[name] = SHAPES[name]
            continue
        images, _, queries = dims.partition("x")
        shapes[name] = (int(images), int(queries))
    return shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,lite", help="comma-separated model presets")
    parser.add_argument(
        "--bundle", type=Path, help="time the two-stream side on this ONNX bundle (one preset)"
    )
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=dict(SHAPES),
        help="comma-separated shapes: flickr30k-1k, mscoco-5k or NAME=IMAGESxQUERIES",
    )
    parser.add_argument("--sample-images", type=int, default=32, help="images timed per tower")
    parser.add_argument("--sample-texts", type=int, default=256, help="captions timed")
    parser.add_argument(
        "--pair-batch", type=int, default=64, help="pairs per cross-encoder call (the sample)"
    )
    parser.add_argument("--batch", type=int, default=16, help="image batch size")
    parser.add_argument("--text-batch", type=int, default=64, help="caption batch size")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of latency timings")
    parser.add_argument("--k", type=int, default=10, help="neighbours per search")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch / onnxruntime / faiss threads (1: stable timings on a shared machine)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench/results/two_stream_vs_cross.json",
        help="JSON results file",
    )
    args = parser.parse_args(argv)
    args.presets = [p for p in args.presets.split(",") if p]
    if args.bundle and len(args.presets) != 1:
        parser.error("--bundle needs exactly one preset (the one the bundle was exported from)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rows = []
    for preset in args.presets:
        rows.append(compare(preset, args))
        print_result(rows[-1])
    results = {
        "command": " ".join(["python -m bench.two_stream_vs_cross", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "threads": args.threads,
        "paper_ratio": PAPER_RATIO,
        "method": "per-item costs measured on samples "
        f"({args.sample_images} images, {args.sample_texts} captions, "
        f"{args.pair_batch} pairs x {args.reps} reps) and extrapolated linearly to the shapes; "
        "exact FAISS search timed at full size; untrained weights",
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("cross-encoder times are extrapolated linearly from sampled pairs")
    print(f"paper: {PAPER_RATIO:,}x against VinVL; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
