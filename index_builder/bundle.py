"""The bundle format: two ONNX towers, a tokenizer and `bundle.json`, defined once, torch-free.

    bundle/
      image_encoder.onnx   pixels float32 (B, 3, S, S) -> embedding float32 (B, D), unit norm
      text_encoder.onnx    input_ids, attention_mask int64 (B, L) -> embedding (B, D), unit norm
      tokenizer.json       Hugging Face tokenizers file
      bundle.json          what a later stage needs to use the files (see `Bundle`)
      video_pooling.onnx   video bundles only: frames float32 (B, N, D) unit frame embeddings
                           from image_encoder.onnx, mask int64 (B, N) -> embedding (B, D);
                           `video_spec` in bundle.json says N, the sampling and the pooling

`training.export` writes bundles with `write_bundle`; indexing and serving read them with
`Bundle.load`, which checks the description, that `bundle_id` is the content address of the
recorded hashes and preprocessing, and the files against their hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from index_builder.atomic import atomic_write_json, read_json, umask
from index_builder.preprocess import ImageSpec, TextSpec, sha256_file
from index_builder.video import VideoSpec

FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
TOKENIZER_JSON = "tokenizer.json"
VIDEO_ONNX = "video_pooling.onnx"
FILES = (IMAGE_ONNX, TEXT_ONNX, TOKENIZER_JSON)
PRECISIONS = ("fp32", "fp16", "int8")
REQUIRED = ("format_version", "bundle_id", "embed_dim", "image_spec", "text_spec", "files")


@dataclass(frozen=True)
class Bundle:
    """A validated bundle directory. `info` is the whole `bundle.json`."""

    path: Path
    bundle_id: str
    embed_dim: int
    image_spec: ImageSpec
    text_spec: TextSpec
    opset: int
    precision: str
    info: dict[str, Any] = field(repr=False)
    video_spec: VideoSpec | None = None  # a video bundle: frames, sampling, pooling

    @property
    def video_onnx(self) -> Path:
        return self.path / VIDEO_ONNX

    @property
    def image_onnx(self) -> Path:
        return self.path / IMAGE_ONNX

    @property
    def text_onnx(self) -> Path:
        return self.path / TEXT_ONNX

    @property
    def tokenizer_json(self) -> Path:
        return self.path / TOKENIZER_JSON

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        """Read and check `bundle.json`; with `verify`, every file must match its sha256."""
        path = Path(path)
        meta_path = path / BUNDLE_JSON
        if not meta_path.is_file():
            raise FileNotFoundError(f"no bundle at {path}: {BUNDLE_JSON} is missing")
        info = read_json(meta_path)
        missing = [key for key in REQUIRED if key not in info]
        if missing:
            raise ValueError(f"{meta_path} lacks {missing}")
        if info["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path} has format_version {info['format_version']}, "
                f"this version of cots reads {FORMAT_VERSION}"
            )
        _check_id(info, meta_path)
        for name in (*FILES, VIDEO_ONNX) if "video_spec" in info else FILES:
            file = path / name
            if not file.is_file():
                raise FileNotFoundError(f"bundle {path} is missing {name}")
            if verify and sha256_file(file) != info["files"].get(name):
                raise ValueError(
                    f"bundle file {file} does not match the sha256 in {BUNDLE_JSON} "
                    "(corrupt or replaced; export the bundle again)"
                )
        return cls(
            path=path,
            bundle_id=str(info["bundle_id"]),
            embed_dim=int(info["embed_dim"]),
            image_spec=ImageSpec.from_dict(info["image_spec"]),
            text_spec=TextSpec.from_dict(info["text_spec"]),
            opset=int(info.get("opset", 0)),
            precision=str(info.get("precision", "fp32")),
            info=info,
            video_spec=VideoSpec.from_dict(info["video_spec"]) if "video_spec" in info else None,
        )


def bundle_id_of(hashes: dict[str, str], embed_dim: int, specs: dict[str, Any]) -> str:
    """Content address: the same files and preprocessing always give the same id."""
    blob = json.dumps({"files": hashes, "embed_dim": embed_dim, **specs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_id(info: dict[str, Any], meta_path: Path) -> None:
    """The recorded id must be the content address of the recorded hashes, dimension and
    preprocessing: a file replaced with its hash updated changes the id, so an index built
    with the old bundle refuses the edited one (its hashes are checked against the files)."""
    specs = {"image_spec": info["image_spec"], "text_spec": info["text_spec"]}
    if "video_spec" in info:
        specs["video_spec"] = info["video_spec"]
    expected = bundle_id_of(info["files"], info["embed_dim"], specs)
    if info["bundle_id"] != expected:
        raise ValueError(
            f"{meta_path}: bundle_id {info['bundle_id']} does not follow from its content "
            f"(its files, dimension and preprocessing give {expected}); the bundle was edited "
            "after export: export it again"
        )


def write_bundle(
    out: str | Path,
    *,
    image_onnx: str | Path,
    text_onnx: str | Path,
    tokenizer_json: str | Path,
    embed_dim: int,
    image_spec: ImageSpec,
    text_spec: TextSpec,
    opset: int,
    precision: str = "fp32",
    extra: dict[str, Any] | None = None,
    video: tuple[str | Path, VideoSpec] | None = None,
) -> Bundle:
    """Copy the files into `out` with a `bundle.json` and return the loaded bundle.

    The bundle is assembled in a temporary directory beside `out` and renamed into place, so
    `out` is either the previous bundle or the complete new one. `extra` (source checkpoint,
    parity error, recall effect of quantisation...) is stored as given. `video` (the
    pooling graph and its `VideoSpec`) makes a video bundle.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if embed_dim <= 0:
        raise ValueError(f"embed_dim must be positive, got {embed_dim}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        # mkdtemp makes 0700: give the usual mode, so that a serving container's user reads it.
        os.chmod(tmp, 0o777 & ~umask())
        sources = dict(zip(FILES, (image_onnx, text_onnx, tokenizer_json), strict=True))
        specs = {"image_spec": image_spec.to_dict(), "text_spec": text_spec.to_dict()}
        if video is not None:
            sources[VIDEO_ONNX] = video[0]
            specs["video_spec"] = video[1].to_dict()
        for name, source in sources.items():
            shutil.copyfile(source, tmp / name)
        hashes = {name: sha256_file(tmp / name) for name in sources}
        info = {
            **(extra or {}),
            "format_version": FORMAT_VERSION,
            "bundle_id": bundle_id_of(hashes, embed_dim, specs),
            "embed_dim": embed_dim,
            **specs,
            "opset": opset,
            "precision": precision,
            "files": hashes,
        }
        atomic_write_json(tmp / BUNDLE_JSON, info)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle.load(out)


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
