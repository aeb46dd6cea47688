"""CLIP's towers in plain torch, parameter names as OpenAI CLIP / open_clip checkpoints have them.

The image tower is CLIP's ViT (openai/CLIP `clip/model.py` `VisionTransformer`; open_clip
`src/open_clip/transformer.py`): a bias-free patch convolution, a class token, a learned
position table, a LayerNorm before the blocks (`ln_pre`) and after them (`ln_post`). The text
tower is CLIP's causal transformer (`CLIP.encode_text`): token and position embeddings, causal
self-attention, `ln_final`, and the state at the end-of-text token as the pooled output.
The checkpoints' projections (`visual.proj`, `text_projection`) are not part of the towers:
`split_clip_state_dict` hands them to the TwoTower's own projections.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from training.towers.checkpointing import run_block

ACTIVATIONS = ("quick_gelu", "gelu")
# Keys of OpenAI / open_clip files that no tower uses: the contrastive temperature (and
# SigLIP's bias), and the scalars OpenAI's TorchScript files carry beside the weights.
UNUSED_KEYS = ("logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP models were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter names (in_proj_*,
    out_proj), computed with the fused kernel and exportable to ONNX."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, W); keep (L, L) bool or None: the keys each query may attend to."""
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3W)
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, W/H)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, L, W/H)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block, CLIP naming: ln_1, attn, ln_2, mlp.c_fc / mlp.c_proj."""

    def __init__(self, width: int, heads: int, hidden: int, activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}")
        self.ln_1 = nn.LayerNorm(width)
        self.attn = ClipAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        gelu = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", gelu),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), keep)
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, hidden: int, activation: str) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, hidden, activation) for _ in range(layers)
        )


def _init_transformer(transformer: ClipTransformer, width: int, layers: int) -> None:
    # openai/CLIP `CLIP.initialize_parameters`.
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    for block in transformer.resblocks:
        assert isinstance(block, ResidualAttentionBlock)
        nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        for name, param in block.mlp.named_parameters():
            if name.endswith("weight"):
                nn.init.normal_(
                    param, std=(2 * width) ** -0.5 if name == "c_fc.weight" else proj_std
                )


class ClipVisionTower(nn.Module):
    """CLIP ViT: pixels (B, 3, S, S) -> patch states (B, N, W) and the class-token state (B, W),
    both after `ln_post` (open_clip's order; the class state is what CLIP projects).

    `mask` (B, N) bool swaps masked patch embeddings for a learned `mask_token` (BEiT)."""

    checkpointing = False
    new_parameters = ("mask_token",)  # not in CLIP checkpoints

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        activation: str = "quick_gelu",
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch {patch_size}")
        self.width = width
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        patches = self.grid_size[0] * self.grid_size[1]
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(patches + 1, width))
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.ln_pre = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.transformer = ClipTransformer(width, layers, heads, hidden, activation)
        self.ln_post = nn.LayerNorm(width)
        _init_transformer(self.transformer, width, layers)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        # The checkpoint's `visual.proj` (W, D) until build_model moves it to the TwoTower.
        self.projection: torch.Tensor | None = None

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.resblocks)

    @property
    def head_modules(self) -> tuple[nn.Module, ...]:
        return (self.ln_post,)

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (B, N, W)
        if mask is not None:
            x = torch.where(mask[:, :, None], self.mask_token.to(x.dtype), x)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + N, W)
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = run_block(block, self.checkpointing, x)
        x = self.ln_post(x)  # (B, 1 + N, W)
        return {"tokens": x[:, 1:], "pooled": x[:, 0]}


class ClipTextTower(nn.Module):
    """CLIP's causal text transformer: (input_ids, attention_mask) -> token states (B, L, W)
    after `ln_final`, and the state at the end-of-text token (B, W).

    OpenAI CLIP pools at `input_ids.argmax(-1)`, the position of `<|endoftext|>` (the largest
    id); with CLIP's tokenizer that is the last real token, which the attention mask gives
    without relying on the id order. Causal attention keeps the real tokens from seeing the
    padding, so any padding length gives the same output."""

    checkpointing = False

    def __init__(
        self,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        intermediate: int,
        context_length: int,
        activation: str = "quick_gelu",
    ) -> None:
        super().__init__()
        self.width = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = ClipTransformer(width, layers, heads, intermediate, activation)
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        _init_transformer(self.transformer, width, layers)
        # The checkpoint's `text_projection` (W, D) until build_model moves it to the TwoTower.
        self.projection: torch.Tensor | None = None

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.resblocks)

    @property
    def head_modules(self) -> tuple[nn.Module, ...]:
        return (self.ln_final,)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]  # (B, L, W)
        positions = torch.arange(length, device=input_ids.device)  # (L,)
        causal = positions[None, :] <= positions[:, None]  # (L, L): key j <= query i
        for block in self.transformer.resblocks:
            x = run_block(block, self.checkpointing, x, causal)
        x = self.ln_final(x)  # (B, L, W)
        last = (attention_mask.sum(1) - 1).clamp(min=0)  # (B,): the end-of-text position
        index = last[:, None, None].expand(-1, 1, x.shape[2])  # (B, 1, W)
        return {"tokens": x, "pooled": x.gather(1, index)[:, 0]}  # pooled (B, W)


def split_clip_state_dict(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One OpenAI / open_clip state dict -> (image tower state with `proj`, text tower state
    with `text_projection`), keys relative to the towers. open_clip's CLIP uses OpenAI's
    names; its CustomTextCLIP puts the text side under `text.`, which is removed."""
    visual, text = {}, {}
    for key, value in state.items():
        if key.startswith("visual."):
            visual[key.removeprefix("visual.")] = value
        elif key not in UNUSED_KEYS:
            text[key.removeprefix("text.")] = value
    if "conv1.weight" not in visual or "token_embedding.weight" not in text:
        raise ValueError(
            "not a CLIP ViT checkpoint (OpenAI / open_clip naming): no visual.conv1.weight "
            "or token_embedding.weight"
        )
    return visual, text
