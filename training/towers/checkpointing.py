"""Activation checkpointing for transformer blocks: recompute in backward, store nothing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_block(block: nn.Module, checkpointing: bool, *args: Any) -> Any:
    """`block(*args)`; with `checkpointing` and autograd on, its activations are recomputed
    in the backward pass (non-reentrant, so frozen blocks and unused inputs are fine).

    Only the transformer towers use it: a CNN block's batch norm would update its running
    statistics a second time when recomputed."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def set_checkpointing(module: nn.Module, enabled: bool) -> list[str]:
    """Switch checkpointing on every tower under `module` that supports it; their names."""
    names = []
    for name, child in module.named_modules():
        if hasattr(type(child), "checkpointing"):
            child.checkpointing = enabled  # type: ignore[assignment]
            names.append(name)
    return names
