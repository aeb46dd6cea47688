"""Paired image/text key queues written through one shared pointer (COTS instance level)."""

from __future__ import annotations

import torch
from torch import nn

from training.distributed import gather_no_grad


class PairQueue(nn.Module):
    """Two FIFO queues of momentum keys, Qv and Qt, each (K, D).

    One pointer writes both, so row k of `image` and row k of `text` always come from the
    same image-caption pair (the task-level KL loss relies on it). Keys are gathered from
    every rank before they are written, so all ranks hold the same queues. Rows not yet
    written are excluded (`image_keys()`/`text_keys()` return the filled part only).
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        self.size = size
        self.register_buffer("image", torch.zeros(size, dim))
        self.register_buffer("text", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def image_keys(self) -> torch.Tensor:
        return self.image[: int(self.filled)]  # (filled, D)

    def text_keys(self) -> torch.Tensor:
        return self.text[: int(self.filled)]  # (filled, D)

    @torch.no_grad()
    def enqueue(self, image_keys: torch.Tensor, text_keys: torch.Tensor) -> None:
        """Write this step's keys (B, D) from every rank at the shared pointer, wrapping."""
        if image_keys.shape != text_keys.shape:
            raise ValueError(f"key shapes differ: {image_keys.shape} vs {text_keys.shape}")
        image_keys = gather_no_grad(image_keys.detach()).to(self.image.dtype)  # (world*B, D)
        text_keys = gather_no_grad(text_keys.detach()).to(self.text.dtype)  # (world*B, D)
        n = image_keys.shape[0]
        if n > self.size:  # only the newest `size` keys would survive anyway
            image_keys, text_keys = image_keys[-self.size :], text_keys[-self.size :]
            self.ptr.add_(n - self.size).remainder_(self.size)
            n = self.size
        rows = (int(self.ptr) + torch.arange(n, device=self.image.device)) % self.size  # (n,)
        self.image[rows] = image_keys
        self.text[rows] = text_keys
        self.ptr.add_(n).remainder_(self.size)
        self.filled.clamp_(min=min(self.size, int(self.filled) + n))
