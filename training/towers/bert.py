"""A compact BERT text tower whose parameter names match Hugging Face `BertModel`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.towers.checkpointing import run_block


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, width: int, max_positions: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.token_type_embeddings = nn.Embedding(2, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, L, W)
        # Single-segment input: token type 0 everywhere, as sentence-transformers feeds it.
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class BertSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, L, W), keep (B, 1, 1, L) bool: the keys each query may attend to."""
        batch, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, W) -> (B, H, L, W/H)
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        # softmax(q k^T / sqrt(d) masked) v in one fused kernel (flash / memory-efficient on
        # CUDA); a bool mask works in every dtype, where an fp32 additive bias broke fp16.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, L, W/H)
        return out.transpose(1, 2).reshape(batch, length, width)


class BertDenseNorm(nn.Module):
    """`dense` then residual and `LayerNorm` (BERT's post-norm sublayer output)."""

    def __init__(self, width_in: int, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(width, heads)
        self.output = BertDenseNorm(width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class BertIntermediate(nn.Module):
    def __init__(self, width: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"


class BertLayer(nn.Module):
    def __init__(self, width: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.attention = BertAttention(width, heads)
        self.intermediate = BertIntermediate(width, intermediate)
        self.output = BertDenseNorm(intermediate, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(width, heads, intermediate) for _ in range(layers))


class BertTower(nn.Module):
    """BERT encoder: (input_ids, attention_mask) -> per-token states and a pooled state.

    `pooling="mean"` averages the states over the attention mask (sentence-transformers'
    all-MiniLM recipe); `pooling="cls"` takes the first token's state. `checkpointing`
    recomputes each layer in the backward pass instead of storing its activations.
    """

    checkpointing = False

    def __init__(
        self,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        intermediate: int,
        max_positions: int,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by {heads} heads")
        self.width = width
        self.pooling = pooling
        self.embeddings = BertEmbeddings(vocab_size, width, max_positions)
        self.encoder = BertEncoder(width, layers, heads, intermediate)
        self.apply(_init_weights)

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.encoder.layer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): padded keys masked
        x = self.embeddings(input_ids)  # (B, L, W)
        for layer in self.encoder.layer:
            x = run_block(layer, self.checkpointing, x, keep)
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            # The average in fp32 (fp16 cannot hold the clamp), returned in the tower's dtype.
            weights = attention_mask.to(torch.float32)[:, :, None]  # (B, L, 1)
            pooled = ((x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)).to(x.dtype)  # (B, W)
        return {"tokens": x, "pooled": pooled}


def _init_weights(module: nn.Module) -> None:
    # BERT's initialiser: N(0, 0.02) for weights, zero biases, unit LayerNorm.
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
