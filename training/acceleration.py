"""Device speed options for a run: channels-last CNN on CUDA, activation checkpointing and
`torch.compile` of the towers (the last two are config switches, off by default)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from training.towers.bert import BertTower
from training.towers.checkpointing import set_checkpointing
from training.towers.efficientnet_lite import EfficientNetLite0
from training.towers.vit import VisionTransformer

log = logging.getLogger(__name__)
TOWERS = (BertTower, VisionTransformer, EfficientNetLite0)


def accelerate(
    modules: Iterable[nn.Module], device: torch.device, checkpointing: bool, compile: bool
) -> None:
    """Apply the options in place to every tower under `modules` (the online model and its
    momentum copy); parameter names and the checkpoint format do not change."""
    for module in modules:
        towers = [m for m in module.modules() if isinstance(m, TOWERS)]
        if device.type == "cuda":
            # cuDNN runs depthwise and 1x1 convolutions fastest in NHWC; a conv whose weight
            # is channels-last makes its output so, and the rest of the CNN follows.
            for tower in towers:
                if isinstance(tower, EfficientNetLite0):
                    tower.to(memory_format=torch.channels_last)
        if checkpointing:
            log.info("activation checkpointing in %s", set_checkpointing(module, True))
        if compile:
            for tower in towers:
                tower.compile()  # in place: state_dict keys keep their names
