"""The training objective as a composition of units, each switched on and weighted by config.

`Objectives` runs the enabled units in config order, weights and sums their losses, and after
backward / after the optimiser step updates the shared state (queues, momentum encoder,
temperature). New units subclass `Objective` (training/objectives/base.py) and register in
`UNITS`; the trainer only ever sees `Objectives`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.config import TrainConfig
from training.objectives.amf import AmfObjective
from training.objectives.anchor import AnchorObjective
from training.objectives.base import MomentumMemory, Objective, StepContext, Temperature
from training.objectives.clip import ClipObjective
from training.objectives.cookie import CookieObjective
from training.objectives.instance import InstanceObjective
from training.objectives.kl import KlObjective
from training.objectives.momentum import MomentumEncoder
from training.objectives.mvlm import MvlmObjective
from training.objectives.queues import PairQueue

# name -> unit class; the config's `objectives` section has one field per name, in the
# order the units run.
UNITS: dict[str, type[Objective]] = {
    unit.name: unit
    for unit in (
        AmfObjective,
        ClipObjective,
        InstanceObjective,
        KlObjective,
        MvlmObjective,
        CookieObjective,
        AnchorObjective,
    )
}


class Objectives(nn.Module):
    """The composed objective; this is the module the trainer wraps in DDP and optimises."""

    def __init__(
        self,
        model: nn.Module,
        units: dict[str, Objective],
        weights: dict[str, float],
        temperature: Temperature,
        memory: MomentumMemory | None = None,
    ) -> None:
        super().__init__()
        if not units:
            raise ValueError("no objective is enabled (set objectives.<name>.enabled=true)")
        needs = [name for name, unit in units.items() if unit.needs_memory]
        if needs and memory is None:
            raise ValueError(f"objectives {needs} need the momentum encoder and queues")
        self.model, self.temperature = model, temperature
        self.units = nn.ModuleDict(units)
        self.weights = dict(weights)
        self.memory = memory  # a plain attribute: not a submodule, so DDP never sees it
        self.last: StepContext | None = None
        self.step_logs: dict[str, float] = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named losses ("loss" is the weighted total, "loss/<name>" each term unweighted)."""
        ctx = StepContext(batch, self.model, self.temperature, self.memory)
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=batch["pixels"].device)
        for unit_name, unit in self.units.items():
            for name, value in unit(ctx).items():
                out[f"loss/{name}"] = value
                total = total + self.weights[unit_name] * unit.loss_weight(name) * value
        out["loss"] = total
        self.last = ctx
        return out

    @torch.no_grad()
    def after_backward(self) -> None:
        """Enqueue this micro-batch's momentum keys (after backward: the logits used the queue)."""
        ctx, self.last = self.last, None
        if ctx is None:
            return
        self.step_logs = dict(ctx.logs)  # logs() is read after this hook has run
        keys = ctx.computed_keys()
        if self.memory is not None and keys is not None:
            self.memory.queue.enqueue(*keys)

    @torch.no_grad()
    def after_step(self) -> None:
        """After each optimiser step: the momentum update and the temperature clamp."""
        if self.memory is not None:
            self.memory.encoder.update(self.model)
        self.temperature.clamp_()

    def logs(self) -> dict[str, float]:
        logs = {"tau": float(self.temperature().detach())}
        logs.update(self.last.logs if self.last is not None else self.step_logs)
        return logs

    def _transient(self) -> tuple[str, ...]:
        """State-dict prefixes never saved: the model (in safetensors) and what units rebuild."""
        prefixes = ["model."]
        for name, unit in self.units.items():
            prefixes += [f"units.{name}.{p}." for p in unit.transient_prefixes()]
        return tuple(prefixes)

    def extra_state(self) -> dict[str, Any]:
        """Everything but the online model weights (which the checkpoint stores in safetensors)
        and the frozen copies units rebuild from config."""
        transient = self._transient()
        state = {k: v for k, v in self.state_dict().items() if not k.startswith(transient)}
        return {
            "modules": state,
            "memory": None if self.memory is None else self.memory.state_dict(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        missing, unexpected = self.load_state_dict(state["modules"], strict=False)
        missing = [k for k in missing if not k.startswith(self._transient())]
        if missing or unexpected:
            raise ValueError(
                f"trainer state does not match the objectives (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}): was it written by another recipe?"
            )
        if (state["memory"] is None) != (self.memory is None):
            raise ValueError("trainer state and recipe disagree on the momentum memory")
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])


def build_objectives(cfg: TrainConfig, model: nn.Module) -> Objectives:
    names = cfg.enabled_units()
    unknown = [n for n in names if n not in UNITS]
    if unknown:
        raise ValueError(f"no implementation registered for objectives {unknown}")
    units = {name: UNITS[name].from_config(cfg, model) for name in names}
    c = cfg.contrast
    temperature = Temperature(
        c.temperature, c.temperature_min, c.temperature_max, c.learn_temperature
    )
    memory = None
    if any(unit.needs_memory for unit in units.values()):
        queue = PairQueue(c.queue_size, model.config.embed_dim)
        memory = MomentumMemory(MomentumEncoder(model, c.momentum), queue)
    weights = {name: cfg.unit(name).weight for name in names}
    return Objectives(model, units, weights, temperature, memory)


def needs_memory(cfg: TrainConfig) -> bool:
    """Whether the enabled units use the queues (known before any model is built)."""
    return any(UNITS[name].needs_memory for name in cfg.enabled_units() if name in UNITS)
