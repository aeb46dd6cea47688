"""The `amf` unit: COTS adaptive momentum filter (AMF): drop likely-noisy pairs using the running
distribution of momentum positive-pair similarities."""

from __future__ import annotations

import torch
from torch import nn

from training.objectives.base import Objective, StepContext


class AdaptiveMomentumFilter(nn.Module):
    """Keep a pair when s = v'.t' >= mean - lam * std of a FIFO of recent similarities.

    The FIFO holds the last `size` momentum positive similarities (the momentum encoders
    move slowly, so their scores form a stable distribution; noisy pairs sit in its low
    tail). Statistics come from the FIFO before the current batch is added; every pair is
    kept during the first `warmup` calls and until the FIFO holds `min_history` scores.
    The state is made of buffers, so it travels with `state_dict` in a checkpoint.
    """

    def __init__(
        self, size: int = 4096, lam: float = 2.0, warmup: int = 100, min_history: int = 256
    ) -> None:
        super().__init__()
        if size < 2:
            raise ValueError(f"AMF queue size must be at least 2, got {size}")
        if not 2 <= min_history <= size:
            raise ValueError(f"AMF min_history must be in [2, {size}], got {min_history}")
        self.lam = lam
        self.warmup = warmup
        self.min_history = min_history
        self.register_buffer("history", torch.zeros(size))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # scores seen
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.last_kept_fraction = 1.0
        self.last_statistics: tuple[float, float] | None = None

    @torch.no_grad()
    def forward(self, similarity: torch.Tensor) -> torch.Tensor:
        """similarity (B,) momentum positive scores -> keep weights (B,) in {0., 1.}."""
        similarity = similarity.detach().float().flatten()
        self.last_statistics = self.statistics()  # what this batch was judged against
        if self.last_statistics is None:
            keep = torch.ones_like(similarity)
        else:
            mean, std = self.last_statistics
            keep = (similarity >= mean - self.lam * std).float()
        self._push(similarity)
        self.calls += 1
        self.last_kept_fraction = float(keep.mean()) if keep.numel() else 1.0
        return keep

    def threshold(self) -> float | None:
        """mean - lam * std of the FIFO, or None while warming up."""
        stats = self.statistics()
        return None if stats is None else stats[0] - self.lam * stats[1]

    def statistics(self) -> tuple[float, float] | None:
        """(mean, std) of the FIFO, or None while warming up."""
        filled = int(min(int(self.count), self.history.numel()))
        if int(self.calls) < self.warmup or filled < self.min_history:
            return None
        scores = self.history[:filled]
        return float(scores.mean()), float(scores.std())

    def _push(self, similarity: torch.Tensor) -> None:
        size = self.history.numel()
        values = similarity[-size:]
        start = (int(self.count) + similarity.numel() - values.numel()) % size
        index = (start + torch.arange(values.numel(), device=values.device)) % size
        self.history[index] = values.to(self.history.device)
        self.count += similarity.numel()


class AmfObjective(Objective):
    """The filter as an objective unit: it adds no loss,
    it sets the step's per-sample weights from s = v'.t' for the units that follow, and logs
    the fraction filtered. Must run before the losses it weights (config order)."""

    name = "amf"
    needs_memory = True  # reads the momentum keys

    def __init__(self, size: int, lam: float, warmup: int, min_history: int) -> None:
        super().__init__()
        self.filter = AdaptiveMomentumFilter(size, lam, warmup, min_history)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("dropped", torch.zeros((), dtype=torch.long))
        # Benchmarks set a list here to collect, per micro-batch, (index, keep, z) where z is
        # each score in FIFO standard deviations from the FIFO mean (None while warming up).
        self.recorder: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None

    @classmethod
    def from_config(cls, cfg, model: nn.Module) -> AmfObjective:
        c = cfg.objectives.amf
        return cls(c.size, c.lam, c.warmup, c.min_history)

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        similarity = (ctx.image_key() * ctx.text_key()).sum(-1)  # (B,) momentum s = v'.t'
        keep = self.filter(similarity)  # (B,)
        ctx.weights = keep if ctx.weights is None else ctx.weights * keep
        self.seen += keep.numel()
        self.dropped += int((keep == 0).sum())
        ctx.logs["amf_filtered"] = 1.0 - self.filter.last_kept_fraction
        ctx.logs["amf_filtered_total"] = float(self.dropped) / max(1, int(self.seen))
        if self.recorder is not None and "index" in ctx.batch:
            stats = self.filter.last_statistics
            z = None if stats is None else (similarity.cpu() - stats[0]) / max(stats[1], 1e-12)
            self.recorder.append((ctx.batch["index"].cpu(), keep.cpu(), z))
        return {}
