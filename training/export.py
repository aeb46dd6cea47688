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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from index_builder import paths
from index_builder.bundle import PRECISIONS, Bundle, write_bundle
from index_builder.preprocess import TextTokenizer, sha256_file
from training.checkpoint import save_checkpoint
from training.config import load_config
from training.model import build_model, stream_embedding
from training.run import model_config

log = logging.getLogger(__name__)
OPSET = 17
# Max |ONNX - torch| per embedding coordinate (unit vectors) accepted for each precision.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "int8": 0.1}
PARITY_BATCHES = (1, 5)


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


def export_onnx(module: nn.Module, feed: dict[str, np.ndarray], path: Path) -> None:
    """TorchScript-based export with a dynamic batch (and sequence) axis, then the checker."""
    import onnx

    names = list(feed)
    axes = {name: {0: "batch"} for name in names} | {"embedding": {0: "batch"}}
    if "input_ids" in feed:
        axes |= {name: {0: "batch", 1: "sequence"} for name in names}
    args = tuple(torch.from_numpy(value) for value in feed.values())
    with warnings.catch_warnings():
        # Shape arithmetic traced as constants; the parity check at two batch sizes is the
        # real test that the graph generalises.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path), full_check=True)


def convert(path: Path, precision: str, out: Path) -> Path:
    """fp32 graph -> fp16 (inputs and outputs stay float32) or dynamic int8 weights."""
    import onnx

    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        _topological_sort(model.graph)  # the converter appends its input casts at the end
        onnx.save(model, str(out))
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.WARNING)  # the quantiser logs one INFO line per tensor
        try:
            # MatMul/Gemm only: ORT's ConvInteger is slower than fp32 Conv on CPU (an
            # EfficientNet image tower ran 13x slower with its convolutions quantised).
            quantize_dynamic(
                str(path),
                str(out),
                op_types_to_quantize=["MatMul", "Gemm"],
                weight_type=QuantType.QInt8,
            )
        finally:
            root.setLevel(level)
    onnx.checker.check_model(str(out))
    return out


def _topological_sort(graph: Any) -> None:
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        blocked = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                blocked.append(node)
        if len(blocked) == len(pending):
            raise ValueError("the converted graph has a cycle or a dangling input")
        pending = blocked
    del graph.node[:]
    graph.node.extend(ordered)


def run_onnx(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0] for feed in feeds]).astype(np.float32)


@torch.no_grad()
def run_torch(module: nn.Module, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    outs = [module(*(torch.from_numpy(v) for v in feed.values())) for feed in feeds]
    return torch.cat(outs).numpy()


def parity(path: Path, module: nn.Module, feeds: list[dict[str, np.ndarray]]) -> float:
    return float(np.abs(run_onnx(path, feeds) - run_torch(module, feeds)).max())


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
    from training.evaluate import retrieval_metrics

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
    from training.checkpoint import WEIGHTS, load_model

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    tolerance = TOLERANCE[precision] if tolerance is None else tolerance
    model, meta = load_model(checkpoint)
    towers = {"image": ImageEncoder(model).eval(), "text": TextEncoder(model).eval()}
    probe = fresh_inputs(model, (2,), seed)
    fresh = fresh_inputs(model, PARITY_BATCHES, seed + 1)
    with tempfile.TemporaryDirectory(prefix="cots-export-") as tmp:
        fp32, final = {}, {}
        for side in ("image", "text"):
            fp32[side] = Path(tmp) / f"{side}.fp32.onnx"
            export_onnx(towers[side], getattr(probe, side)[0], fp32[side])
            final[side] = fp32[side]
            if precision != "fp32":
                final[side] = convert(fp32[side], precision, Path(tmp) / f"{side}.{precision}.onnx")
        errors = {s: parity(final[s], towers[s], getattr(fresh, s)) for s in final}
        video = _export_video(model, final["image"], Path(tmp), errors, seed)
        worst = max(errors.values())
        log.info("ONNX vs torch max abs error: %s (tolerance %g)", errors, tolerance)
        if not worst <= tolerance:
            raise ValueError(
                f"ONNX Runtime and torch disagree by {worst:.3g} (> tolerance {tolerance:g}, "
                f"{', '.join(f'{s} {e:.3g}' for s, e in errors.items())}); no bundle written"
            )
        extra: dict[str, Any] = {
            "source": {
                "checkpoint": str(Path(checkpoint).resolve()),
                "step": meta.get("step"),
                "weights_sha256": sha256_file(Path(checkpoint) / WEIGHTS),
                "model": meta.get("model", {}).get("name"),
                "recipe": meta.get("recipe"),
            },
            "parity": {
                "max_abs_error": {s: float(f"{e:.3g}") for s, e in errors.items()},
                "tolerance": tolerance,
                "batch_sizes": list(PARITY_BATCHES),
                "reference": "torch fp32",
            },
        }
        if precision != "fp32":
            held_out, owner = (
                sample_inputs(model, dataset, split, samples)
                if dataset is not None
                else (fresh_inputs(model, (min(samples, 256),), seed + 2), None)
            )
            pairs = {s: (fp32[s], final[s]) for s in final}
            extra["retrieval_effect"] = {
                "sample": f"{dataset}:{split}" if dataset is not None else "synthetic inputs",
                **retrieval_effect(pairs, held_out, owner),
            }
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


def _export_video(
    model: Any, image_onnx: Path, tmp: Path, errors: dict[str, float], seed: int
) -> tuple[Path, Any] | None:
    """A video model's pooling graph (always fp32: it is tiny), with its parity on random
    frame embeddings ("video_pooling") and on whole videos through both graphs ("video")."""
    if getattr(model, "video_pool", None) is None:
        return None
    from training import video

    graph = video.PoolingGraph(model).eval()
    path = tmp / "video_pooling.onnx"
    export_onnx(graph, video.pooling_feeds(model, (2,), seed)[0], path)
    errors["video_pooling"] = parity(path, graph, video.pooling_feeds(model, PARITY_BATCHES, seed))
    errors["video"] = video.end_to_end_error(model, image_onnx, path, seed + 3)
    return path, model.video_spec
