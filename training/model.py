"""The two-tower model: `build_model` (towers, pretrained weights, the projections' start,
freezing) and the names to use it: `ModelConfig` and the presets (training/model_config.py),
`TwoTower` and `stream_embedding` (training/two_tower.py), the video model
(training/video_model.py) and the towers (training/towers/build.py)."""

from __future__ import annotations

import logging

import torch

from training.model_config import ModelConfig, list_presets, load_preset
from training.semantic import class_texts, conse_start, embed_class_texts
from training.towers import weights
from training.towers.build import build_image_tower, build_text_tower
from training.towers.freezing import set_trainable_blocks
from training.two_tower import TwoTower, stream_embedding
from training.video_model import VideoTwoTower

__all__ = [
    "ModelConfig",
    "TwoTower",
    "VideoTwoTower",
    "build_model",
    "list_presets",
    "load_preset",
    "start_projections",
    "start_semantic",
    "stream_embedding",
]
log = logging.getLogger(__name__)


def build_model(config: ModelConfig, load_weights: bool = True) -> TwoTower:
    """Build the towers, load pretrained weights (unless `load_weights=False`, e.g. when a
    checkpoint will overwrite them) and apply the freezing options."""
    tokenizer_json = config.tokenizer_json()
    image_tower = build_image_tower(config, load_weights)
    text_tower = build_text_tower(config, load_weights)
    set_trainable_blocks(image_tower, config.image_trainable_blocks)
    set_trainable_blocks(text_tower, config.text_trainable_blocks)
    if config.video_frames:
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
