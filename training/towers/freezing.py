"""Freezing a tower entirely or all but its last blocks; frozen BatchNorm stays in eval mode."""

from __future__ import annotations

from torch import nn


def set_trainable_blocks(tower: nn.Module, trainable_blocks: int) -> None:
    """-1: everything trains; 0: the tower is frozen; N: only its last N blocks and what follows
    them (final norm / head conv) train. Parameters named in `tower.new_parameters` (mask
    embeddings, absent from pretrained weights) always train."""
    blocks: list[nn.Module] = tower.blocks  # type: ignore[assignment]
    if trainable_blocks < -1:
        raise ValueError(f"trainable blocks must be -1, 0 or positive, got {trainable_blocks}")
    if trainable_blocks > len(blocks):
        raise ValueError(
            f"{type(tower).__name__} has {len(blocks)} blocks, "
            f"cannot train the last {trainable_blocks}"
        )
    if trainable_blocks == -1:
        tower.requires_grad_(True)
        return
    tower.requires_grad_(False)
    if trainable_blocks > 0:
        for block in blocks[len(blocks) - trainable_blocks :]:
            block.requires_grad_(True)
        for module in getattr(tower, "head_modules", ()):
            module.requires_grad_(True)
    for name in getattr(tower, "new_parameters", ()):
        getattr(tower, name).requires_grad_(True)


def freeze_norm_statistics(module: nn.Module) -> None:
    """Put every BatchNorm whose affine parameters are frozen into eval mode, so that a frozen
    CNN keeps its pretrained running statistics while the rest of the model trains."""
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in child.parameters()
        ):
            child.eval()
