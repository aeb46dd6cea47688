"""Speed options for a run's towers: activation checkpointing and `torch.compile` (config
switches, off by default). Always on elsewhere: the CNN's channels-last weights (the tower
itself), fused AdamW on CUDA (`trainer.build_optimizer`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

from training.towers.bert import BertTower
from training.towers.checkpointing import set_checkpointing
from training.towers.clip import ClipTextTower, ClipVisionTower
from training.towers.efficientnet_lite import EfficientNetLite0
from training.towers.vit import VisionTransformer

log = logging.getLogger(__name__)
TOWERS = (BertTower, VisionTransformer, EfficientNetLite0, ClipVisionTower, ClipTextTower)


def accelerate(
    modules: Iterable[nn.Module], checkpointing: bool = False, compile_backend: str | None = None
) -> None:
    """Apply the options in place to every tower under `modules` (the online model and its
    momentum copy); parameter names and the checkpoint format do not change.
    `compile_backend`: None for eager towers, else a `torch.compile` backend ("inductor")."""
    for module in modules:
        if checkpointing:
            log.info("activation checkpointing in %s", set_checkpointing(module, True))
        if compile_backend:
            for tower in [m for m in module.modules() if isinstance(m, TOWERS)]:
                tower.compile(backend=compile_backend)  # in place: state_dict keys unchanged
