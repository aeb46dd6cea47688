"""The two-tower network: each stream's tower output to its unit embedding
(`stream_embedding`, shared by training and export) and `TwoTower`, the image and text towers
with their projections (and COOKIE's shared transformer, and the semantic branch)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.model_config import ModelConfig
from training.semantic import SemanticHead, class_texts
from training.shared_transformer import SharedTransformer
from training.towers.freezing import freeze_norm_statistics


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
