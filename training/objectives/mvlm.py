"""The `mvlm` unit: COTS token level (masked vision-language modelling). Masked words and
masked visual tokens, each predicted from its own stream's token state joined with the other
stream's global feature.

The heads live beside the model, never inside it: the towers that `cots export` writes carry
no trace of them, so query time stays two independent towers (METHOD.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from index_builder.preprocess import TextTokenizer
from training.objectives.base import Objective, StepContext
from training.objectives.masking import IGNORE_INDEX, mask_patches, mask_text
from training.visual_tokenizer.model import VisualTokenizer, load_tokenizer


class MaskedTokenHead(nn.Module):
    """logits = MLP([h_token ; g_other]) over a vocabulary, evaluated at masked positions only.

    MLM: h = text tower state of a masked word, g = paired image's global feature,
    vocabulary = word pieces. MVM: h = image tower state of a masked patch (or feature-map
    cell), g = paired caption's global feature, vocabulary = the visual tokenizer's codes.
    The MLP is BERT's prediction-head transform (dense, GELU, LayerNorm) then the decoder.
    """

    def __init__(
        self, token_width: int, global_width: int, vocab_size: int, hidden: int | None = None
    ) -> None:
        super().__init__()
        hidden = hidden or token_width
        self.last_accuracy: torch.Tensor | None = None
        self.mlp = nn.Sequential(
            nn.Linear(token_width + global_width, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden),
            nn.Linear(hidden, vocab_size),
        )

    def forward(
        self,
        tokens: torch.Tensor,  # (B, N, W) states of the masked input
        global_feature: torch.Tensor,  # (B, G) the paired sample's global feature
        labels: torch.Tensor,  # (B, N) target ids, IGNORE_INDEX where nothing was masked
        weights: torch.Tensor | None = None,  # (B,) per-sample weights (noisy-pair filter)
    ) -> torch.Tensor:
        """Cross-entropy averaged over masked positions (weighted by their sample's weight)."""
        if tokens.shape[:2] != labels.shape:
            raise ValueError(
                f"token states {tuple(tokens.shape)} do not match labels {tuple(labels.shape)}"
            )
        rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # (M,), (M,)
        if rows.numel() == 0:  # nothing masked in this batch: a zero that keeps the graph
            self.last_accuracy = None
            return tokens.sum() * 0.0 + global_feature.sum() * 0.0
        joined = torch.cat([tokens[rows, cols], global_feature[rows]], dim=-1)  # (M, W + G)
        logits = self.mlp(joined).float()  # (M, V)
        target = labels[rows, cols]  # (M,)
        self.last_accuracy = (logits.detach().argmax(-1) == target).float().mean()
        per_token = F.cross_entropy(logits, target, reduction="none")  # (M,)
        if weights is None:
            return per_token.mean()
        token_weights = weights.to(per_token.dtype)[rows]  # (M,)
        return (per_token * token_weights).sum() / token_weights.sum().clamp_min(1e-6)


class MvlmObjective(Objective):
    """MLM + MVM as an objective unit.

    MLM: mask the caption (BERT 80/10/10), run the text tower on it, predict each masked word
    from [h_word ; v]. MVM: mask ~40% of the patch grid block-wise (BEiT), run the image tower
    with the learned mask embedding, predict each masked patch's visual-token code (frozen
    tokenizer, unmasked image) from [h_patch ; t]. v and t are the paired sample's online
    embeddings of this step (unit vectors scaled by sqrt(D), so their entries are of the size
    of the layer-normed token states): the global feature of the other stream.
    """

    name = "mvlm"
    needs_memory = False

    def __init__(
        self,
        model: nn.Module,
        tokenizer: VisualTokenizer | None,
        text_tokenizer: TextTokenizer | None,
        text_mask_prob: float = 0.15,
        patch_mask_ratio: float = 0.4,
        min_block: int = 4,
        head_hidden: int = 0,
    ) -> None:
        super().__init__()
        if tokenizer is None and text_tokenizer is None:
            raise ValueError("objectives.mvlm is enabled with both mlm and mvm switched off")
        dim = model.config.embed_dim
        self.global_scale = math.sqrt(dim)
        self.text_mask_prob, self.patch_mask_ratio = text_mask_prob, patch_mask_ratio
        self.min_block = min_block
        self.mlm_head = self.mvm_head = None
        self.tokenizer = tokenizer
        if text_tokenizer is not None:
            self.vocab_size = text_tokenizer.vocab_size
            self.mask_id = text_tokenizer.token_id("[MASK]")
            self.special_ids = [text_tokenizer.token_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")]
            width = model.text_tower.width
            self.mlm_head = MaskedTokenHead(width, dim, self.vocab_size, head_hidden or None)
        if tokenizer is not None:
            check_tokenizer_fits(tokenizer, model)
            width = model.image_tower.width
            size = tokenizer.config.codebook_size
            self.mvm_head = MaskedTokenHead(width, dim, size, head_hidden or None)

    @classmethod
    def from_config(cls, cfg, model: nn.Module) -> MvlmObjective:
        c = cfg.objectives.mvlm
        if getattr(cfg.data, "cache_frozen_features", False):
            raise ValueError(
                "objectives.mvlm runs the towers on masked inputs, which cached features "
                "cannot do: set data.cache_frozen_features=false"
            )
        tokenizer = None
        if c.mvm:
            if not c.tokenizer:
                raise ValueError(
                    "objectives.mvlm.mvm needs objectives.mvlm.tokenizer: a visual tokenizer "
                    "directory (train one with `cots tokenizer train`)"
                )
            tokenizer, meta = load_tokenizer(c.tokenizer)
            check_normalisation(meta, model)
        text = (
            TextTokenizer(model.tokenizer_json, model.text_spec.context_length) if c.mlm else None
        )
        return cls(
            model, tokenizer, text, c.text_mask_prob, c.patch_mask_ratio, c.min_block, c.head_hidden
        )

    def train(self, mode: bool = True) -> MvlmObjective:
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()  # frozen: its codebook must not follow the EMA updates
        return self

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        model, batch, losses = ctx.model, ctx.batch, {}
        if self.mlm_head is not None:
            ids, labels = mask_text(
                batch["input_ids"],
                batch["attention_mask"],
                mask_id=self.mask_id,
                special_ids=self.special_ids,
                vocab_size=self.vocab_size,
                prob=self.text_mask_prob,
            )
            words = model.text_features(ids, batch["attention_mask"])["tokens"]  # (B, L, W)
            image_global = ctx.image() * self.global_scale  # (B, D)
            losses["mlm"] = self.mlm_head(words, image_global, labels, ctx.weights)
            _log_accuracy(ctx, "mlm_acc", self.mlm_head)
        if self.mvm_head is not None:
            pixels = batch["pixels"]
            grid = model.image_grid
            with torch.autocast(pixels.device.type, enabled=False):  # exact nearest codes
                codes = self.tokenizer.encode(pixels.float(), grid=grid)  # (B, N)
            rng = np.random.default_rng(int(torch.randint(2**31, (1,))))  # follows torch's seed
            masked = mask_patches(
                pixels.shape[0], grid, self.patch_mask_ratio, min_block=self.min_block, rng=rng
            ).to(pixels.device)  # (B, N)
            with frozen_norm_statistics(model.image_tower):
                patches = model.image_features(pixels, masked)["tokens"]  # (B, N, W)
            labels = torch.where(masked, codes, torch.full_like(codes, IGNORE_INDEX))
            text_global = ctx.text() * self.global_scale  # (B, D)
            losses["mvm"] = self.mvm_head(patches, text_global, labels, ctx.weights)
            _log_accuracy(ctx, "mvm_acc", self.mvm_head)
        return losses


@contextlib.contextmanager
def frozen_norm_statistics(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but leave their running statistics
    alone: the masked pass (mask embeddings in the stem) must not shift the statistics that
    the unmasked pass, evaluation and the momentum copy use (EfficientNet; ViT has none)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for norm, momentum in zip(norms, saved, strict=True):
            norm.momentum = momentum


def _log_accuracy(ctx: StepContext, name: str, head: MaskedTokenHead) -> None:
    """Top-1 accuracy at the masked positions of this step (a training diagnostic)."""
    if head.last_accuracy is not None:
        ctx.logs[name] = float(head.last_accuracy)


def check_tokenizer_fits(tokenizer: VisualTokenizer, model: nn.Module) -> None:
    """The code grid must be the tower's patch grid at the model's input size."""
    size = model.config.image_size
    grid = tokenizer.grid(size, size)
    if grid != tuple(model.image_grid):
        raise ValueError(
            f"visual tokenizer (stride {tokenizer.config.stride}) gives a {grid[0]}x{grid[1]} "
            f"grid at {size}px but the image tower has {model.image_grid[0]}x"
            f"{model.image_grid[1]} patches: train it with `cots tokenizer train --preset` "
            "of this model"
        )


def check_normalisation(meta: dict, model: nn.Module) -> None:
    """The tokenizer reads the pixels the tower reads: same mean and std."""
    spec = meta.get("image_spec") or {}
    ours = model.image_spec
    if tuple(spec.get("mean", ())) != ours.mean or tuple(spec.get("std", ())) != ours.std:
        raise ValueError(
            f"visual tokenizer was trained with mean/std {spec.get('mean')}/{spec.get('std')} "
            f"but the model normalises with {list(ours.mean)}/{list(ours.std)}"
        )
