"""The training objective as a composition of units, each switched on and weighted by config.

A unit is an `Objective`: it reads what it needs from the step's `StepContext` (embeddings,
momentum keys, queues, per-sample weights), returns named unweighted losses, and may leave
scalars in `ctx.logs`. `Objectives` runs the enabled units in config order, weights and sums
their losses, and after backward / after the optimiser step updates the shared state
(queues, momentum encoder, temperature). New units register a builder in `UNITS`; the
trainer only ever sees `Objectives`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from training.amf import AmfObjective
from training.config import TrainConfig
from training.losses import ClipLoss, MomentumContrastLoss, Temperature
from training.momentum import MomentumEncoder
from training.mvlm import MvlmObjective
from training.queues import PairQueue
from training.task_alignment import KlObjective


class MomentumMemory:
    """The momentum encoder and the paired queues: state shared by units, outside DDP
    (no gradients; the keys are gathered explicitly before they are enqueued)."""

    def __init__(self, encoder: MomentumEncoder, queue: PairQueue) -> None:
        self.encoder, self.queue = encoder, queue

    def to(self, device: torch.device) -> MomentumMemory:
        self.encoder.to(device)
        self.queue.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder.state_dict(), "queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.queue.load_state_dict(state["queue"])


class StepContext:
    """One micro-batch: the batch, lazily computed (and cached) embeddings and keys, the
    per-sample weights a filter unit may set, and scalars to log."""

    def __init__(
        self,
        batch: dict[str, torch.Tensor],
        model: nn.Module,
        temperature: Temperature,
        memory: MomentumMemory | None,
    ) -> None:
        self.batch, self.model, self.temperature, self.memory = batch, model, temperature, memory
        self.cache: dict[str, Any] = {}
        self.weights: torch.Tensor | None = None  # (B,) per-sample loss weights
        self.logs: dict[str, float] = {}

    def cached(self, name: str, compute: Callable[[], Any]) -> Any:
        if name not in self.cache:
            self.cache[name] = compute()
        return self.cache[name]

    def image(self) -> torch.Tensor:  # (B, D) online v
        return self.cached("image", lambda: self.model.encode_image(self.batch["pixels"]))

    def text(self) -> torch.Tensor:  # (B, D) online t
        b = self.batch
        return self.cached(
            "text", lambda: self.model.encode_text(b["input_ids"], b["attention_mask"])
        )

    def image_key(self) -> torch.Tensor:  # (B, D) momentum v'
        return self.cached(
            "image_key", lambda: self._memory().encoder.encode_image(self.batch["pixels"])
        )

    def text_key(self) -> torch.Tensor:  # (B, D) momentum t'
        b, enc = self.batch, self._memory().encoder
        return self.cached("text_key", lambda: enc.encode_text(b["input_ids"], b["attention_mask"]))

    def tau(self) -> torch.Tensor:
        return self.temperature()

    def _memory(self) -> MomentumMemory:
        if self.memory is None:
            raise RuntimeError("this objective needs the momentum memory, which is not built")
        return self.memory


class Objective(nn.Module):
    """One unit of the training objective."""

    name: ClassVar[str]
    needs_memory: ClassVar[bool] = False  # uses momentum keys / queues

    @classmethod
    def from_config(cls, cfg: TrainConfig, model: nn.Module) -> Objective:
        return cls()

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class ClipObjective(Objective):
    """In-batch symmetric InfoNCE: the `clip` baseline."""

    name = "clip"

    def __init__(self) -> None:
        super().__init__()
        self.loss = ClipLoss()

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"clip": self.loss(ctx.image(), ctx.text(), ctx.tau(), ctx.weights)}


class InstanceObjective(Objective):
    """COTS instance level: momentum contrast against the paired queues. Leaves its logits
    in `ctx.cache` ("logits_i2t", "logits_t2i") for the task-level alignment."""

    name = "instance"
    needs_memory = True

    def __init__(self) -> None:
        super().__init__()
        self.loss = MomentumContrastLoss()

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        queue = ctx._memory().queue
        out = self.loss(
            ctx.image(),
            ctx.text(),
            ctx.image_key(),
            ctx.text_key(),
            queue.image_keys().clone(),  # clone: the queue is written before backward ends
            queue.text_keys().clone(),
            ctx.tau(),
            ctx.weights,
        )
        ctx.cache["logits_i2t"], ctx.cache["logits_t2i"] = out.logits_i2t, out.logits_t2i
        return {"instance": out.loss}


# name -> unit class; the config's `objectives` section has one field per name, in the
# order the units run.
# The COTS units (amf, kl, mvlm) follow the same protocol; they live in their own modules.
UNITS: dict[str, type[nn.Module]] = {
    "amf": AmfObjective,
    "clip": ClipObjective,
    "instance": InstanceObjective,
    "kl": KlObjective,
    "mvlm": MvlmObjective,
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
                total = total + self.weights[unit_name] * value
        out["loss"] = total
        self.last = ctx
        return out

    @torch.no_grad()
    def after_backward(self) -> None:
        """Enqueue this micro-batch's momentum keys (after backward: the logits used the queue)."""
        ctx, self.last = self.last, None
        if ctx is not None:
            self.step_logs = dict(ctx.logs)  # logs() is read after this hook has run
        if ctx is not None and self.memory is not None and "image_key" in ctx.cache:
            self.memory.queue.enqueue(ctx.cache["image_key"], ctx.cache["text_key"])

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

    def extra_state(self) -> dict[str, Any]:
        """Everything but the online model weights (which the checkpoint stores in safetensors)."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}
        return {
            "modules": state,
            "memory": None if self.memory is None else self.memory.state_dict(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        missing, unexpected = self.load_state_dict(state["modules"], strict=False)
        missing = [k for k in missing if not k.startswith("model.")]
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
