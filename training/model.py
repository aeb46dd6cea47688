"""The two-tower model: config, presets, build_model, and the TwoTower encode/feature API."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from index_builder.preprocess import ImageSpec, TextSpec, TextTokenizer, default_tokenizer_json
from index_builder.video import VideoSpec
from training.semantic import (
    SemanticHead,
    class_file,
    class_texts,
    conse_start,
    embed_class_texts,
)
from training.shared_transformer import POOLING as SHARED_POOLING
from training.shared_transformer import SharedTransformer
from training.towers import weights
from training.towers.bert import BertTower
from training.towers.clip import (
    ACTIVATIONS,
    ClipTextTower,
    ClipVisionTower,
    split_clip_state_dict,
)
from training.towers.clip_tokenizer import clip_tokenizer_json
from training.towers.efficientnet_lite import STRIDE as EFFICIENTNET_STRIDE
from training.towers.efficientnet_lite import EfficientNetLite0
from training.towers.freezing import freeze_norm_statistics, set_trainable_blocks
from training.towers.vit import VisionTransformer, resize_pos_embed

log = logging.getLogger(__name__)
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
    # Video (training/video.py): 0 = an image model; N = videos of N uniformly sampled frames
    # through the image tower, pooled over time by meanP or seqTransf (CLIP4Clip).
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


def stream_embedding(
    features: dict,
    proj: nn.Module,
    token_map: nn.Module | None = None,
    shared: nn.Module | None = None,
    mask: torch.Tensor | None = None,
    normalize: bool = True,
    semantic: tuple[nn.Module, nn.Module] | None = None,
) -> torch.Tensor:
    """One stream's tower output -> its embedding (B, D): the pooled state, or with COOKIE's
    shared transformer the token sequence mapped to the shared width, run through it and
    pooled; then the projection, plus (image side, `semantic` = (head, projection)) the
    projected ConSE vector of the pooled state; then L2 normalisation. Training and export
    both call this."""
    if shared is None:
        pooled = features["pooled"]  # (B, W)
    else:
        assert token_map is not None
        pooled = shared(token_map(features["tokens"]), mask)  # (B, N, W) -> (B, C)
    embedding = proj(pooled)  # (B, D)
    if semantic is not None:
        head, semantic_proj = semantic
        embedding = embedding + semantic_proj(head(features["pooled"]))  # (B, D)
    return F.normalize(embedding, dim=-1) if normalize else embedding


class TwoTower(nn.Module):
    """Image tower + text tower, each followed by a linear projection to the shared space;
    with `shared_layers > 0` (COOKIE) a weight-sharing transformer sits between each tower's
    token sequence (after a per-stream linear map to its width) and the projection.

    No cross-stream module: each side encodes alone, so a gallery is embedded once offline.
    """

    def __init__(
        self,
        config: ModelConfig,
        image_tower: nn.Module,
        text_tower: nn.Module,
        tokenizer_json: Path,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_spec = config.image_spec()
        self.text_spec = config.text_spec()
        self.tokenizer_json = tokenizer_json
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_map: nn.Linear | None = None
        self.text_map: nn.Linear | None = None
        self.shared: SharedTransformer | None = None
        image_width, text_width = image_tower.width, text_tower.width
        if config.shared_layers > 0:
            width = config.shared_width
            self.image_map = nn.Linear(image_tower.width, width)
            self.text_map = nn.Linear(text_tower.width, width)
            self.shared = SharedTransformer(
                width,
                config.shared_layers,
                config.shared_heads,
                config.shared_mlp_ratio,
                config.shared_pooling,
            )
            image_width = text_width = width
        self.image_proj = nn.Linear(image_width, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width, config.embed_dim, bias=False)
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
        self.semantic: SemanticHead | None = None
        self.semantic_proj: nn.Linear | None = None
        if config.semantic_classes is not None:
            classes = len(class_texts(config.semantic_classes))
            self.semantic = SemanticHead(
                image_tower.width,
                classes,
                text_tower.width,
                config.semantic_temperature,
                config.semantic_top,
            )
            self.semantic_proj = nn.Linear(text_tower.width, config.embed_dim, bias=False)
            if config.semantic_lock_text:
                self.text_proj.requires_grad_(False)
                self.semantic_proj.requires_grad_(False)

    @property
    def semantic_branch(self) -> tuple[nn.Module, nn.Module] | None:
        """(head, projection) of the semantic branch, or None."""
        if self.semantic is None or self.semantic_proj is None:
            return None
        return self.semantic, self.semantic_proj

    @property
    def image_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image tower's token grid: ViT patches or last-stage CNN cells."""
        return self.image_tower.grid_size

    def image_features(self, pixels: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """pixels (B, 3, S, S), optional bool mask (B, N) -> tokens (B, N, W), pooled (B, W).

        Masked patches (ViT) or last-stage cells (CNN) are swapped for a learned embedding."""
        return self.image_tower(pixels, mask)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """(B, L) int64 ids and mask -> {"tokens": (B, L, W), "pooled": (B, W)}."""
        return self.text_tower(input_ids, attention_mask)

    def embed_image(self, features: dict, normalize: bool = True) -> torch.Tensor:
        """The image tower's output (`image_features`) -> embedding (B, D)."""
        return stream_embedding(
            features,
            self.image_proj,
            self.image_map,
            self.shared,
            None,
            normalize,
            self.semantic_branch,
        )

    def embed_text(
        self, features: dict, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """The text tower's output (`text_features`) and its mask -> embedding (B, D)."""
        return stream_embedding(
            features, self.text_proj, self.text_map, self.shared, attention_mask, normalize
        )

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.embed_image(self.image_features(pixels), normalize)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        features = self.text_features(input_ids, attention_mask)
        return self.embed_text(features, attention_mask, normalize)

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict:
        return {
            "image": self.encode_image(pixels),
            "text": self.encode_text(input_ids, attention_mask),
        }

    def train(self, mode: bool = True) -> TwoTower:
        super().train(mode)
        freeze_norm_statistics(self)
        return self


def build_model(config: ModelConfig, load_weights: bool = True) -> TwoTower:
    """Build the towers, load pretrained weights (unless `load_weights=False`, e.g. when a
    checkpoint will overwrite them) and apply the freezing options."""
    tokenizer_json = config.tokenizer_json()
    image_tower = build_image_tower(config, load_weights)
    text_tower = build_text_tower(config, load_weights)
    set_trainable_blocks(image_tower, config.image_trainable_blocks)
    set_trainable_blocks(text_tower, config.text_trainable_blocks)
    if config.video_frames:
        from training.video import VideoTwoTower

        video = VideoTwoTower(config, image_tower, text_tower, tokenizer_json)
        start_projections(video)
        return video
    model = TwoTower(config, image_tower, text_tower, tokenizer_json)
    start_projections(model)
    if load_weights and model.semantic is not None and model.semantic_proj is not None:
        start_semantic(model, config)
    return model


def start_projections(model: TwoTower) -> None:
    """Projections a tower's checkpoint brought (CLIP's `visual.proj` and `text_projection`,
    (W, D), applied as x @ P) become the TwoTower's projections (weight (D, W))."""
    pairs = (
        ("image", model.image_tower, model.image_proj),
        ("text", model.text_tower, model.text_proj),
    )
    for side, tower, proj in pairs:
        loaded = getattr(tower, "projection", None)
        if loaded is None:
            continue
        tower.projection = None
        if model.shared is not None:
            log.info(
                "the %s weights' projection is unused: the shared transformer comes first", side
            )
            continue
        if tuple(loaded.shape) != (proj.in_features, proj.out_features):
            raise ValueError(
                f"the {side} weights' projection is {tuple(loaded.shape)}, the model's "
                f"(width, embed_dim) is {(proj.in_features, proj.out_features)}: set "
                f"embed_dim={loaded.shape[-1]}"
            )
        with torch.no_grad():
            proj.weight.copy_(loaded.T)


def start_semantic(model: TwoTower, config: ModelConfig) -> None:
    """The semantic branch from the pretrained towers: the image classifier's weights, the
    text tower's class embeddings, and the ConSE start of the projections."""
    assert model.semantic is not None and model.semantic_proj is not None
    if not config.image_weights:
        raise ValueError("semantic_classes needs image_weights (the pretrained classifier)")
    state = weights.read_state_dict(weights.resolve_weights(config.image_weights))
    head = {k.removeprefix("_fc."): v for k, v in state.items() if k.startswith("_fc.")}
    weights.load_strict(model.semantic.classifier, head, f"{config.image_weights} _fc")
    texts = class_texts(config.semantic_classes or "")
    embeddings = embed_class_texts(model.text_tower, model.tokenizer_json, texts)
    model.semantic.class_embeddings.copy_(embeddings)
    conse_start(model.semantic_proj, model.text_proj, model.image_proj, embeddings)


def build_image_tower(config: ModelConfig, load_weights: bool = True) -> nn.Module:
    """The image tower with its pretrained weights (when configured and `load_weights`)."""
    tower: nn.Module
    if config.image_tower == "efficientnet_lite0":
        tower = EfficientNetLite0(config.image_size)
    elif config.image_tower == "clip_vit":
        tower = ClipVisionTower(
            image_size=config.image_size,
            patch_size=config.vit_patch_size,
            width=config.vit_width,
            layers=config.vit_layers,
            heads=config.vit_heads,
            mlp_ratio=config.vit_mlp_ratio,
            activation=config.clip_activation,
        )
    else:
        tower = VisionTransformer(
            image_size=config.image_size,
            patch_size=config.vit_patch_size,
            width=config.vit_width,
            layers=config.vit_layers,
            heads=config.vit_heads,
            mlp_ratio=config.vit_mlp_ratio,
        )
    if load_weights and config.image_weights:
        _load_image_weights(tower, config.image_weights)
    return tower


def build_text_tower(config: ModelConfig, load_weights: bool = True) -> nn.Module:
    """The text tower with its pretrained weights (when configured and `load_weights`)."""
    shape = {
        "vocab_size": TextTokenizer(config.tokenizer_json(), config.context_length).vocab_size,
        "width": config.text_width,
        "layers": config.text_layers,
        "heads": config.text_heads,
        "intermediate": config.text_intermediate,
    }
    if config.text_tower == "clip":
        clip = ClipTextTower(
            **shape, context_length=config.text_max_positions, activation=config.clip_activation
        )
        if load_weights and config.text_weights:
            _load_clip_weights(clip, config.text_weights)
        return clip
    tower = BertTower(**shape, max_positions=config.text_max_positions, pooling=config.text_pooling)
    if load_weights and config.text_weights:
        _load_text_weights(tower, config.text_weights)
    return tower


def _load_clip_weights(tower: ClipVisionTower | ClipTextTower, spec: str) -> None:
    """One side of an OpenAI / open_clip CLIP file, strictly; its projection is kept on the
    tower for `start_projections`."""
    path = weights.resolve_weights(spec)
    visual, text = split_clip_state_dict(weights.read_state_dict(path))
    if isinstance(tower, ClipVisionTower):
        state, projection = visual, visual.pop("proj", None)
        pos = state.get("positional_embedding")
        if pos is not None and pos.shape != tower.positional_embedding.shape:
            state["positional_embedding"] = resize_pos_embed(pos[None], tower.grid_size)[0]
        weights.load_strict(tower, state, f"{path} (visual.)", new=tower.new_parameters)
    else:
        state, projection = text, text.pop("text_projection", None)
        weights.load_strict(tower, state, f"{path} (text)")
    if projection is None:
        raise ValueError(
            f"weights {path} have no {'visual.proj' if state is visual else 'text_projection'}"
        )
    tower.projection = projection.float()


def _load_image_weights(tower: nn.Module, spec: str) -> None:
    if isinstance(tower, ClipVisionTower):
        _load_clip_weights(tower, spec)
        return
    path = weights.resolve_weights(spec)
    state = weights.read_state_dict(path)
    if isinstance(tower, EfficientNetLite0):
        # lukemelas efficientnet_pytorch naming; `_fc` is the ImageNet classifier.
        weights.load_strict(tower, state, str(path), ignore=("_fc.",), new=tower.new_parameters)
        return
    pos = state.get("pos_embed")
    if pos is not None and pos.shape[1] != tower.pos_embed.shape[1]:
        state["pos_embed"] = resize_pos_embed(pos, tower.grid_size)
    # timm naming; `head` is the classifier.
    weights.load_strict(tower, state, str(path), ignore=("head.",), new=tower.new_parameters)


def _load_text_weights(tower: BertTower, spec: str) -> None:
    path = weights.resolve_weights(spec)
    state = {k.removeprefix("bert."): v for k, v in weights.read_state_dict(path).items()}
    # Hugging Face BERT naming; the pooler, pre-training heads and id buffers are unused.
    ignore = ("pooler.", "cls.", "embeddings.position_ids", "embeddings.token_type_ids")
    weights.load_strict(tower, state, str(path), ignore=ignore)
