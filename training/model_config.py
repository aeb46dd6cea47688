"""The model's configuration: `ModelConfig` (every key that builds a TwoTower, checked on
construction) and the presets (JSON files of those keys under `presets/`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index_builder.preprocess import ImageSpec, TextSpec, default_tokenizer_json
from index_builder.video import VideoSpec
from training.semantic import class_file
from training.shared_transformer import POOLING as SHARED_POOLING
from training.towers.clip import ACTIVATIONS
from training.towers.clip_tokenizer import clip_tokenizer_json
from training.towers.efficientnet_lite import STRIDE as EFFICIENTNET_STRIDE

PRESET_DIR = Path(__file__).resolve().parent / "presets"
IMAGE_TOWERS = ("vit", "efficientnet_lite0", "clip_vit")
TEXT_TOWERS = ("bert", "clip")
TEXT_POOLING = ("mean", "cls", "eot")


@dataclass
class ModelConfig:
    """Everything that builds a TwoTower; presets are JSON files of these keys.

    `*_weights`: None (random init), `package:<distribution>` (weights shipped in an installed
    package) or a file path (safetensors or torch pickle; timm ViT / Hugging Face BERT naming;
    for the clip_vit / clip towers one OpenAI or open_clip CLIP file, TorchScript included,
    whose `visual.proj` / `text_projection` become the projections).
    `*_trainable_blocks`: -1 all trainable, 0 frozen, N the last N blocks; the projections
    always train.
    `shared_*`: COOKIE's weight-sharing transformer (training/shared_transformer.py) between
    the towers' token sequences and the projections; `shared_layers=0` (COTS, CLIP) has none.
    """

    name: str = "custom"
    embed_dim: int = 256
    image_tower: str = "vit"
    image_size: int = 224
    image_resize: int | None = None  # shorter side before the centre crop; None = image_size
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    image_interpolation: str = "bicubic"
    image_weights: str | None = None
    image_trainable_blocks: int = -1
    vit_patch_size: int = 16
    vit_width: int = 768
    vit_layers: int = 12
    vit_heads: int = 12
    vit_mlp_ratio: float = 4.0
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    text_max_positions: int = 512
    text_tower: str = "bert"  # or "clip" (CLIP's causal transformer, eot pooling)
    text_pooling: str = "mean"  # bert: mean or cls; clip: eot (the end-of-text token)
    text_weights: str | None = None
    text_trainable_blocks: int = -1
    tokenizer: str | None = None  # tokenizer.json; None = all-MiniLM-L6-v2's (bert), CLIP's (clip)
    clip_activation: str = "quick_gelu"  # CLIP towers' MLP: OpenAI's quick_gelu, or gelu
    context_length: int = 32
    # Video (training/video_model.py): 0 = an image model; N = videos of N uniformly sampled
    # frames through the image tower, pooled over time by meanP or seqTransf (CLIP4Clip).
    video_frames: int = 0
    video_pooling: str = "meanP"
    video_layers: int = 4  # seqTransf only
    video_heads: int = 8  # seqTransf only
    shared_layers: int = 0
    shared_width: int = 256
    shared_heads: int = 4
    shared_mlp_ratio: float = 4.0
    shared_pooling: str = "mean"  # mean over the real tokens, or cls (a learned query token)
    # The semantic branch (training/semantic.py): None = none; "imagenet" (or a class TSV) =
    # the image tower's pretrained classifier read through the text tower (ConSE), projected
    # beside the visual projection; the model then starts as ConSE (`conse_start`).
    semantic_classes: str | None = None
    semantic_temperature: float = 1.0  # of the classifier's softmax
    semantic_top: int = 5  # classes kept and renormalised (ConSE's T); 0 = all
    # Lock the text space (LiT, Zhai et al. 2022, with the roles swapped): the text and
    # semantic projections stay at the ConSE start, only the visual projection trains.
    semantic_lock_text: bool = False

    def __post_init__(self) -> None:
        self.image_mean = tuple(self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(self.image_std)  # type: ignore[assignment]
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if not _has_type(value, str(item.type)):
                raise ValueError(f"model config {item.name} must be {item.type}, got {value!r}")
        if self.image_tower not in IMAGE_TOWERS:
            raise ValueError(
                f"image_tower must be one of {', '.join(IMAGE_TOWERS)}, got {self.image_tower!r}"
            )
        if self.text_tower not in TEXT_TOWERS:
            raise ValueError(
                f"text_tower must be one of {', '.join(TEXT_TOWERS)}, got {self.text_tower!r}"
            )
        if self.text_pooling not in TEXT_POOLING:
            raise ValueError(
                f"text_pooling must be one of {', '.join(TEXT_POOLING)}, got {self.text_pooling!r}"
            )
        if (self.text_tower == "clip") != (self.text_pooling == "eot"):
            raise ValueError(
                f"text_pooling eot goes with text_tower clip (and only with it), got "
                f"{self.text_pooling!r} with {self.text_tower!r}"
            )
        if self.clip_activation not in ACTIVATIONS:
            raise ValueError(
                f"clip_activation must be one of {', '.join(ACTIVATIONS)}, "
                f"got {self.clip_activation!r}"
            )
        if self.context_length > self.text_max_positions:
            raise ValueError(
                f"context_length {self.context_length} exceeds "
                f"text_max_positions {self.text_max_positions}"
            )
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")
        if self.video_frames < 0:
            raise ValueError(f"video_frames must be >= 0, got {self.video_frames}")
        if self.video_frames:
            self.video_spec()  # an unknown pooling is a ValueError here
        self._check_shared()
        self._check_semantic()

    def _check_semantic(self) -> None:
        if self.semantic_classes is None:
            return
        if self.image_tower != "efficientnet_lite0" or self.video_frames:
            raise ValueError(
                "semantic_classes needs the efficientnet_lite0 image tower on images "
                "(its classifier head); set semantic_classes=null"
            )
        if self.shared_layers:
            raise ValueError("semantic_classes does not combine with shared_layers (COOKIE)")
        class_file(self.semantic_classes)  # a missing class file fails before any weights load
        if self.semantic_temperature <= 0 or self.semantic_top < 0:
            raise ValueError(
                f"semantic_temperature must be > 0 and semantic_top >= 0, got "
                f"{self.semantic_temperature} and {self.semantic_top}"
            )

    def _check_shared(self) -> None:
        if self.shared_layers < 0:
            raise ValueError(f"shared_layers must be >= 0, got {self.shared_layers}")
        if self.shared_width < 1 or self.shared_heads < 1:
            raise ValueError(
                f"shared_width and shared_heads must be positive, got "
                f"{self.shared_width} and {self.shared_heads}"
            )
        if self.shared_width % self.shared_heads:
            raise ValueError(
                f"shared_width {self.shared_width} is not divisible by "
                f"shared_heads {self.shared_heads}"
            )
        if self.shared_pooling not in SHARED_POOLING:
            raise ValueError(
                f"shared_pooling must be one of {', '.join(SHARED_POOLING)}, "
                f"got {self.shared_pooling!r}"
            )

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ModelConfig:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(obj) - set(known))
        if unknown:
            raise ValueError(
                f"unknown model config key(s): {', '.join(unknown)} (known: {', '.join(known)})"
            )
        return cls(**obj)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every key's default value."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @property
    def image_stride(self) -> int:
        """Pixels per side of one image token: a ViT patch or a last-stage EfficientNet cell."""
        return (
            EFFICIENTNET_STRIDE if self.image_tower == "efficientnet_lite0" else self.vit_patch_size
        )

    def image_spec(self) -> ImageSpec:
        return ImageSpec(
            size=self.image_size,
            resize=self.image_resize or self.image_size,
            mean=self.image_mean,
            std=self.image_std,
            interpolation=self.image_interpolation,
        )

    def tokenizer_json(self) -> Path:
        """The tokenizer.json file: `tokenizer`, else the text tower's own."""
        if self.tokenizer:
            return Path(self.tokenizer)
        return clip_tokenizer_json() if self.text_tower == "clip" else default_tokenizer_json()

    def text_spec(self) -> TextSpec:
        return TextSpec(context_length=self.context_length)

    def video_spec(self) -> VideoSpec:
        return VideoSpec(frames=self.video_frames, pooling=self.video_pooling)


def _has_type(value: Any, annotation: str) -> bool:
    if annotation.startswith("tuple"):
        return len(value) == 3 and all(_has_type(v, "float") for v in value)
    allowed = {"int": (int,), "float": (int, float), "str": (str,)}
    kind, _, optional = annotation.partition(" | ")
    if optional == "None" and value is None:
        return True
    if kind == "bool":
        return isinstance(value, bool)
    return isinstance(value, allowed[kind]) and not isinstance(value, bool)


def list_presets() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> ModelConfig:
    path = PRESET_DIR / f"{name}.json"
    if name not in list_presets():
        raise ValueError(f"unknown preset {name!r} (available: {', '.join(list_presets())})")
    return ModelConfig.from_dict({"name": name, **json.loads(path.read_text())})
