"""Each tower built from a `ModelConfig`, with its pretrained weights: timm ViT,
lukemelas EfficientNet-Lite0, Hugging Face BERT, or one side of an OpenAI / open_clip CLIP
file (whose projection the tower keeps for `training.model.start_projections`)."""

from __future__ import annotations

from torch import nn

from index_builder.preprocess import TextTokenizer
from training.model_config import ModelConfig
from training.towers import weights
from training.towers.bert import BertTower
from training.towers.clip import ClipTextTower, ClipVisionTower, split_clip_state_dict
from training.towers.efficientnet_lite import EfficientNetLite0
from training.towers.vit import VisionTransformer, resize_pos_embed


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
