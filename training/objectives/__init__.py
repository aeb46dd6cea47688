"""The training objective: one module per unit (clip, instance, kl, amf, mvlm, cookie), what they
share (base.py: StepContext, Objective, the momentum memory) and their composition
(compose.py: Objectives, build_objectives)."""

from training.objectives.base import MomentumMemory, Objective, StepContext, Temperature
from training.objectives.compose import UNITS, Objectives, build_objectives, needs_memory

__all__ = [
    "UNITS",
    "MomentumMemory",
    "Objective",
    "Objectives",
    "StepContext",
    "Temperature",
    "build_objectives",
    "needs_memory",
]
