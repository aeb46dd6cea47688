"""`cots export`: checkpoint -> ONNX bundle, checked against torch before it is written.

As timm `utils/onnx.py`: export each tower (with its projection and L2 normalisation, and
nothing else: training-only heads never reach the bundle), run the ONNX checker, then compare
ONNX Runtime with torch on fresh inputs at two batch sizes. fp16 (GPU) and dynamic int8 (CPU)
variants record what they do to retrieval: top-10 agreement with fp32 and R@K on a sample.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from index_builder import paths
from index_builder.bundle import PRECISIONS, Bundle, write_bundle
from index_builder.preprocess import TextTokenizer, sha256_file
from training.checkpoint import WEIGHTS, load_model, save_checkpoint
from training.config import load_config
from training.evaluate import retrieval_metrics
from training.model import build_model, stream_embedding
from training.onnx_graph import OPSET, PARITY_BATCHES, convert, export_onnx, parity, run_onnx
from training.run import model_config
from training.video_export import export_video
from training.video_model import VideoTwoTower

log = logging.getLogger(__name__)
# Max |ONNX - torch| per embedding coordinate (unit vectors) accepted for each precision.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "int8": 0.1}


class ImageEncoder(nn.Module):
    """What the image bundle holds: tower -> [map -> shared transformer (COOKIE)] ->
    projection -> L2 normalisation (`stream_embedding`, as in training)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.tower, self.proj = model.image_tower, model.image_proj
        self.token_map, self.shared = model.image_map, model.shared
        self.semantic, self.semantic_proj = model.semantic, model.semantic_proj

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.tower(pixels)
        branch = None if self.semantic is None else (self.semantic, self.semantic_proj)
        return stream_embedding(
            features, self.proj, self.token_map, self.shared, semantic=branch
        )  # (B, D)


class TextEncoder(nn.Module):
    """What the text bundle holds: tower -> [map -> shared transformer (COOKIE)] ->
    projection -> L2 normalisation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.tower, self.proj = model.text_tower, model.text_proj
        self.token_map, self.shared = model.text_map, model.shared

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = self.tower(input_ids, attention_mask)
        return stream_embedding(
            features, self.proj, self.token_map, self.shared, attention_mask
        )  # (B, D)


@dataclass(frozen=True)
class Inputs:
    """Held-out inputs for one side: pixels, or (input_ids, attention_mask)."""

    image: list[dict[str, np.ndarray]]
    text: list[dict[str, np.ndarray]]


def fresh_inputs(model: Any, batches: tuple[int, ...], seed: int) -> Inputs:
    """Random pixels and token sequences with padding, one feed per batch size."""
    rng = np.random.default_rng(seed)
    size, length = model.image_spec.size, model.text_spec.context_length
    vocab = TextTokenizer(model.tokenizer_json, length).vocab_size
    image, text = [], []
    for batch in batches:
        image.append({"pixels": rng.standard_normal((batch, 3, size, size)).astype(np.float32)})
        lengths = rng.integers(2, length + 1, batch)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)  # (B, L)
        ids = rng.integers(1, vocab, (batch, length)).astype(np.int64) * mask
        text.append({"input_ids": ids, "attention_mask": mask})
    return Inputs(image, text)


def top10_agreement(images: tuple[np.ndarray, np.ndarray], texts: tuple[np.ndarray, ...]) -> float:
    """Fraction of the fp32 top-10 images per text query that the variant also returns."""
    k = min(10, len(images[0]))
    ref = np.argsort(-(texts[0] @ images[0].T), axis=1)[:, :k]
    var = np.argsort(-(texts[1] @ images[1].T), axis=1)[:, :k]
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ref, var, strict=True)]))


def sample_inputs(model: Any, dataset: str | Path, split: str, limit: int) -> tuple[Inputs, list]:
    """Preprocessed images and captions of a held-out split (the training eval transform)."""
    from index_builder.manifest import image_path, load_records
    from index_builder.preprocess import load_image, preprocess_images

    records = load_records(dataset, split)[:limit]
    if not records:
        raise ValueError(f"split {split!r} of {dataset} has no records to measure recall on")
    tokenizer = TextTokenizer(model.tokenizer_json, model.text_spec.context_length)
    image, text, owner = [], [], []
    for start in range(0, len(records), 32):
        chunk = records[start : start + 32]
        images = [load_image(image_path(dataset, r), model.image_spec.background) for r in chunk]
        image.append({"pixels": preprocess_images(images, model.image_spec)})
        captions = [(start + i, c) for i, r in enumerate(chunk) for c in r.captions]
        ids, mask = tokenizer([c for _, c in captions])
        text.append({"input_ids": ids, "attention_mask": mask})
        owner += [i for i, _ in captions]
    return Inputs(image, text), owner


def retrieval_effect(
    paths: dict[str, tuple[Path, Path]], inputs: Inputs, owner: list[int] | None
) -> dict[str, Any]:
    """Variant vs fp32 on the same inputs: top-10 agreement, and R@K both ways with a dataset."""
    images = tuple(run_onnx(p, inputs.image) for p in paths["image"])
    texts = tuple(run_onnx(p, inputs.text) for p in paths["text"])
    effect: dict[str, Any] = {
        "queries": len(texts[0]),
        "gallery": len(images[0]),
        "top10_agreement": round(top10_agreement(images, texts), 4),  # type: ignore[arg-type]
    }
    if owner is not None:
        for name, i in (("fp32", 0), ("variant", 1)):
            metrics = retrieval_metrics(
                torch.from_numpy(images[i]), torch.from_numpy(texts[i]), torch.tensor(owner)
            )
            effect[name] = {k: round(v, 2) for k, v in metrics.items()}
        effect["rsum_change"] = round(effect["variant"]["rsum"] - effect["fp32"]["rsum"], 2)
    return effect


def step_zero_checkpoint(recipe: str, sets: list[str]) -> Path:
    """The recipe's model as built, before any training, saved as a checkpoint under
    $COTS_HOME/runs/<name>-step0[-<hash of the overrides>] (what a run's step 0 is)."""
    cfg = load_config(recipe, sets)
    model = build_model(model_config(cfg)).eval()
    tag = hashlib.sha256("\n".join(sets).encode()).hexdigest()[:8] if sets else ""
    out = paths.home() / "runs" / "-".join(filter(None, (cfg.name, "step0", tag)))
    return save_checkpoint(out, model, {"step": 0, "recipe": cfg.name, "overrides": sets})


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    precision: str = "fp32",
    tolerance: float | None = None,
    dataset: str | Path | None = None,
    split: str = "test",
    samples: int = 500,
    seed: int = 0,
) -> Bundle:
    """Export, check and write a bundle; raise ValueError if ONNX and torch disagree."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    tolerance = TOLERANCE[precision] if tolerance is None else tolerance
    model, meta = load_model(checkpoint)
    with tempfile.TemporaryDirectory(prefix="cots-export-") as tmp:
        fp32, final, errors = export_towers(model, precision, Path(tmp), seed)
        video = None
        if isinstance(model, VideoTwoTower):  # its pooling graph: always fp32 (it is tiny)
            video = export_video(model, final["image"], Path(tmp), errors, seed)
        extra: dict[str, Any] = {
            "source": source_record(checkpoint, meta),
            "parity": checked_parity(errors, tolerance),
        }
        if precision != "fp32":
            pairs = {s: (fp32[s], final[s]) for s in final}
            extra["retrieval_effect"] = variant_effect(model, pairs, dataset, split, samples, seed)
        return write_bundle(
            out,
            image_onnx=final["image"],
            text_onnx=final["text"],
            tokenizer_json=model.tokenizer_json,
            embed_dim=model.config.embed_dim,
            image_spec=model.image_spec,
            text_spec=model.text_spec,
            opset=OPSET,
            precision=precision,
            extra=extra,
            video=video,
        )


def export_towers(
    model: Any, precision: str, tmp: Path, seed: int
) -> tuple[dict[str, Path], dict[str, Path], dict[str, float]]:
    """Both towers as fp32 graphs under `tmp`, converted to `precision`: the fp32 and final
    paths per side, and each final graph's max |ONNX - torch| on fresh inputs."""
    towers = {"image": ImageEncoder(model).eval(), "text": TextEncoder(model).eval()}
    probe = fresh_inputs(model, (2,), seed)
    fresh = fresh_inputs(model, PARITY_BATCHES, seed + 1)
    fp32, final = {}, {}
    for side in ("image", "text"):
        fp32[side] = tmp / f"{side}.fp32.onnx"
        export_onnx(towers[side], getattr(probe, side)[0], fp32[side])
        final[side] = fp32[side]
        if precision != "fp32":
            final[side] = convert(fp32[side], precision, tmp / f"{side}.{precision}.onnx")
    errors = {s: parity(final[s], towers[s], getattr(fresh, s)) for s in final}
    return fp32, final, errors


def checked_parity(errors: dict[str, float], tolerance: float) -> dict[str, Any]:
    """The bundle's parity record; ValueError when a graph is off by more than `tolerance`."""
    worst = max(errors.values())
    log.info("ONNX vs torch max abs error: %s (tolerance %g)", errors, tolerance)
    if not worst <= tolerance:
        raise ValueError(
            f"ONNX Runtime and torch disagree by {worst:.3g} (> tolerance {tolerance:g}, "
            f"{', '.join(f'{s} {e:.3g}' for s, e in errors.items())}); no bundle written"
        )
    return {
        "max_abs_error": {s: float(f"{e:.3g}") for s, e in errors.items()},
        "tolerance": tolerance,
        "batch_sizes": list(PARITY_BATCHES),
        "reference": "torch fp32",
    }


def source_record(checkpoint: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Where the bundle's weights come from: the checkpoint, its step, weights and recipe."""
    return {
        "checkpoint": str(Path(checkpoint).resolve()),
        "step": meta.get("step"),
        "weights_sha256": sha256_file(Path(checkpoint) / WEIGHTS),
        "model": meta.get("model", {}).get("name"),
        "recipe": meta.get("recipe"),
    }


def variant_effect(
    model: Any,
    pairs: dict[str, tuple[Path, Path]],
    dataset: str | Path | None,
    split: str,
    samples: int,
    seed: int,
) -> dict[str, Any]:
    """What an fp16 / int8 variant does to retrieval, on a dataset's split or on synthetic
    inputs when there is none."""
    held_out, owner = (
        sample_inputs(model, dataset, split, samples)
        if dataset is not None
        else (fresh_inputs(model, (min(samples, 256),), seed + 2), None)
    )
    return {
        "sample": f"{dataset}:{split}" if dataset is not None else "synthetic inputs",
        **retrieval_effect(pairs, held_out, owner),
    }
