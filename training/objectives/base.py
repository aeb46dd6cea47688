"""What every objective unit shares: the step context, the unit base class, the momentum
memory (momentum encoder + paired queues), the temperature and the per-sample weighted mean.

A unit is an `Objective`: it reads what it needs from the step's `StepContext` (embeddings,
tower outputs, momentum keys, queues, per-sample weights), returns named unweighted losses,
and may leave scalars in `ctx.logs`. The context computes each quantity at most once per
micro-batch, whichever unit asks first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from training.objectives.momentum import MomentumEncoder
from training.objectives.queues import PairQueue


class Temperature(nn.Module):
    """A learnable softmax temperature tau, kept in [min_value, max_value] (ALBEF's `temp`)."""

    def __init__(
        self,
        init: float = 0.07,
        min_value: float = 0.001,
        max_value: float = 0.5,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if not min_value <= init <= max_value:
            raise ValueError(f"temperature {init} outside [{min_value}, {max_value}]")
        self.min_value, self.max_value = min_value, max_value
        self.tau = nn.Parameter(torch.tensor(float(init)), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        return self.tau.clamp(self.min_value, self.max_value)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Called after each optimiser step so the stored value never leaves the range."""
        self.tau.clamp_(self.min_value, self.max_value)


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B,) losses; with per-sample weights (the noisy-pair filter) a weighted mean."""
    if weights is None:
        return per_sample.mean()
    weights = weights.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1e-6)


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


@dataclass(frozen=True)
class QueuedLogits:
    """The instance unit's logits over {positive, K queued pairs}, for the task-level KL."""

    i2t: torch.Tensor  # (B, 1 + K): positive at column 0, then the queued texts
    t2i: torch.Tensor  # (B, 1 + K): positive at column 0, then the queued images


class StepContext:
    """One micro-batch: the batch, the online tower outputs and embeddings, the momentum keys
    (each computed once, on first use), the per-sample weights a filter unit may set, what
    one unit hands to a later one (`queued_logits`), and scalars to log."""

    def __init__(
        self,
        batch: dict[str, torch.Tensor],
        model: nn.Module,
        temperature: Temperature,
        memory: MomentumMemory | None,
    ) -> None:
        self.batch, self.model, self.temperature, self.memory = batch, model, temperature, memory
        self.weights: torch.Tensor | None = None  # (B,) per-sample loss weights
        self.queued_logits: QueuedLogits | None = None  # set by `instance`, read by `kl`
        self.logs: dict[str, float] = {}
        self._image_features: dict[str, torch.Tensor] | None = None
        self._text_features: dict[str, torch.Tensor] | None = None
        self._image: torch.Tensor | None = None
        self._text: torch.Tensor | None = None
        self._keys: tuple[torch.Tensor, torch.Tensor] | None = None

    def image_features(self) -> dict[str, torch.Tensor]:
        """The online image tower's output: "tokens" (B, N, W) and "pooled" (B, W)."""
        if self._image_features is None:
            self._image_features = self.model.image_features(self.batch["pixels"])
        return self._image_features

    def text_features(self) -> dict[str, torch.Tensor]:
        """The online text tower's output: "tokens" (B, L, W) and "pooled" (B, W)."""
        if self._text_features is None:
            b = self.batch
            self._text_features = self.model.text_features(b["input_ids"], b["attention_mask"])
        return self._text_features

    def image(self) -> torch.Tensor:  # (B, D) online v
        if self._image is None:
            self._image = self.model.embed_image(self.image_features())
        return self._image

    def text(self) -> torch.Tensor:  # (B, D) online t
        if self._text is None:
            mask = self.batch["attention_mask"]
            self._text = self.model.embed_text(self.text_features(), mask)
        return self._text

    def keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum keys (v' (B, D), t' (B, D)) of this batch."""
        if self._keys is None:
            b, encoder = self.batch, self.momentum().encoder
            self._keys = (
                encoder.encode_image(b["pixels"]),
                encoder.encode_text(b["input_ids"], b["attention_mask"]),
            )
        return self._keys

    def image_key(self) -> torch.Tensor:  # (B, D) momentum v'
        return self.keys()[0]

    def text_key(self) -> torch.Tensor:  # (B, D) momentum t'
        return self.keys()[1]

    def computed_keys(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The momentum keys if a unit computed them this step (they go into the queues)."""
        return self._keys

    def tau(self) -> torch.Tensor:
        return self.temperature()

    def momentum(self) -> MomentumMemory:
        if self.memory is None:
            raise RuntimeError("this objective needs the momentum memory, which is not built")
        return self.memory


class Objective(nn.Module):
    """One unit of the training objective. Subclasses set `name` (the config section under
    `objectives`), say whether they need the momentum memory, and implement `forward`."""

    name: ClassVar[str]
    needs_memory: ClassVar[bool] = False  # uses momentum keys / queues

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module) -> Objective:
        return cls()

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss_weight(self, loss_name: str) -> float:
        """Weight of one of this unit's named losses inside the unit (1 unless a unit weighs
        its own terms); the unit's config weight multiplies it."""
        return 1.0

    def transient_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes (relative to the unit) that are rebuilt from config rather than
        saved with the trainer state, e.g. frozen copies of pretrained towers."""
        return ()
