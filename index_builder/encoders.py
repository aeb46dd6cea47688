"""Torch-free image and text encoders over a bundle: preprocessing, batching, ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from index_builder.bundle import Bundle
from index_builder.preprocess import TextTokenizer, load_image_for, preprocess_images
from index_builder.video import video_pixels


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def open_session(path: Path, threads: int | None, providers: Sequence[str] | None) -> Any:
    """An InferenceSession; a file ONNX Runtime cannot load is a ValueError naming it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: onnxruntime decides
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            str(path), options, providers=list(providers or default_providers())
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        reason = " ".join(str(exc).split())[:300]
        raise ValueError(f"{path} is not a loadable ONNX model: {reason}") from None


def _check_io(session: Any, path: Path, inputs: tuple[str, ...], dim: int) -> None:
    names = tuple(i.name for i in session.get_inputs())
    if sorted(names) != sorted(inputs):
        raise ValueError(f"{path} has inputs {names}, expected {inputs}")
    outputs = session.get_outputs()
    if [o.name for o in outputs] != ["embedding"] or outputs[0].shape[-1] not in (dim, None):
        raise ValueError(f"{path} must have one output 'embedding' of width {dim}")


def _normalise(vectors: np.ndarray) -> np.ndarray:
    # The graph normalises already; fp16/int8 graphs drift by ~1e-3, so finish in float32.
    vectors = vectors.astype(np.float32, copy=False)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _batched(
    count: int, batch_size: int, run: Callable[[slice], np.ndarray], dim: int
) -> np.ndarray:
    if count == 0:
        return np.zeros((0, dim), np.float32)
    parts = [run(slice(i, i + batch_size)) for i in range(0, count, batch_size)]
    return _normalise(np.concatenate(parts))


class ImageEncoder:
    """Images -> (B, D) float32 unit vectors with the bundle's image tower."""

    def __init__(
        self,
        bundle: Bundle,
        threads: int | None = None,
        batch_size: int = 64,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.bundle = bundle
        self.spec = bundle.image_spec
        self.batch_size = batch_size
        self.session = open_session(bundle.image_onnx, threads, providers)
        _check_io(self.session, bundle.image_onnx, ("pixels",), bundle.embed_dim)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed pixels (B, 3, S, S) -> (B, D)."""
        size = self.spec.size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"pixels must have shape (B, 3, {size}, {size}), got {pixels.shape}")
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        return _batched(
            len(pixels),
            self.batch_size,
            lambda s: self.session.run(None, {"pixels": pixels[s]})[0],
            self.bundle.embed_dim,
        )

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded RGB images -> (B, D), preprocessed batch by batch."""
        return _batched(
            len(images),
            self.batch_size,
            lambda s: self.session.run(None, {"pixels": preprocess_images(images[s], self.spec)})[
                0
            ],
            self.bundle.embed_dim,
        )

    def encode_paths(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Image files -> (B, D); decoding happens per batch, so memory stays bounded."""

        def run(s: slice) -> np.ndarray:
            images = [load_image_for(p, self.spec) for p in paths[s]]
            return self.session.run(None, {"pixels": preprocess_images(images, self.spec)})[0]

        return _batched(len(paths), self.batch_size, run, self.bundle.embed_dim)


class TextEncoder:
    """Texts -> (B, D) float32 unit vectors with the bundle's text tower and tokenizer."""

    def __init__(
        self,
        bundle: Bundle,
        threads: int | None = None,
        batch_size: int = 256,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.bundle = bundle
        self.batch_size = batch_size
        self.tokenizer = TextTokenizer(bundle.tokenizer_json, bundle.text_spec.context_length)
        self.session = open_session(bundle.text_onnx, threads, providers)
        _check_io(self.session, bundle.text_onnx, ("input_ids", "attention_mask"), bundle.embed_dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)

        def run(s: slice) -> np.ndarray:
            ids, mask = self.tokenizer(texts[s])
            return self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]

        return _batched(len(texts), self.batch_size, run, self.bundle.embed_dim)


class VideoEncoder:
    """Videos -> (B, D) unit vectors: every sampled frame through the image encoder, then the
    bundle's temporal pooling graph (`video_pooling.onnx`)."""

    def __init__(
        self,
        bundle: Bundle,
        image: ImageEncoder,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        if bundle.video_spec is None:
            raise ValueError(f"bundle {bundle.bundle_id} is not a video bundle (no video_spec)")
        self.bundle, self.image, self.spec = bundle, image, bundle.video_spec
        self.session = open_session(bundle.video_onnx, threads, providers)
        _check_io(self.session, bundle.video_onnx, ("frames", "mask"), bundle.embed_dim)

    def encode_pixels(self, pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Frames (B, N, 3, S, S) and their mask (B, N) bool (`video_pixels`) -> (B, D)."""
        count, dim = self.spec.frames, self.bundle.embed_dim
        if pixels.ndim != 5 or pixels.shape[1] != count or mask.shape != pixels.shape[:2]:
            raise ValueError(f"videos must be (B, {count}, 3, S, S) with a (B, {count}) mask")
        mask = np.asarray(mask, dtype=bool)
        frames = np.zeros((len(pixels), count, dim), np.float32)  # (B, N, D)
        frames[mask] = self.image.encode_pixels(pixels[mask])
        feed = {"frames": frames, "mask": mask.astype(np.int64)}
        return _normalise(self.session.run(None, feed)[0])

    def encode_clips(self, clips: Sequence[Sequence[Image.Image]]) -> np.ndarray:
        """Sampled frames of each video (`decode_video(...).frames`) -> (B, D)."""
        made = [video_pixels(frames, self.image.spec, self.spec.frames) for frames in clips]
        if not made:
            return np.zeros((0, self.bundle.embed_dim), np.float32)
        pixels, mask = (np.stack(part) for part in zip(*made, strict=True))
        return self.encode_pixels(pixels, mask)


@dataclass(frozen=True)
class Encoders:
    """Both towers of one bundle, opened with ONNX Runtime (and, for a video bundle, the
    video encoder over the image tower)."""

    bundle: Bundle
    text: TextEncoder
    image: ImageEncoder
    video: VideoEncoder | None = None

    @classmethod
    def open(cls, bundle: Bundle, threads: int | None = None, batch_size: int = 32) -> Encoders:
        image = ImageEncoder(bundle, threads=threads, batch_size=batch_size)
        return cls(
            bundle,
            text=TextEncoder(bundle, threads=threads, batch_size=batch_size),
            image=image,
            video=VideoEncoder(bundle, image, threads) if bundle.video_spec else None,
        )

    def encode(self, modality: str, queries: list[Any]) -> np.ndarray:
        """(Q, D) unit vectors: "text" queries are strings, "image" ones (3, S, S) pixels,
        "video" ones (pixels (N, 3, S, S), mask (N,)) pairs."""
        if modality == "text":
            return self.text.encode(queries)
        if modality == "video":
            if self.video is None:
                raise ValueError(f"bundle {self.bundle.bundle_id} cannot encode videos")
            pixels, mask = (np.stack(part) for part in zip(*queries, strict=True))
            return self.video.encode_pixels(pixels, mask)
        return self.image.encode_pixels(np.stack(queries))
