"""The `cookie` unit: COOKIE's contrastive knowledge sharing, one symmetric in-batch InfoNCE
per configured (source, target, weight) pair of named features.

Features (METHOD.md, "COOKIE"):

    image, text                  the embeddings (after the shared transformer, when the model
                                 has one), (B, D)
    image_tower, text_tower      the online towers' pooled outputs, before the shared
                                 transformer, (B, W)
    image_teacher, text_teacher  a frozen copy of the pretrained tower's pooled output of the
                                 same image / text, (B, W)

Our default reading pairs image-text, image-image_teacher and text-text_teacher; the other
reading (features before vs after the shared transformer) is image-image_tower and
text-text_tower. A feature whose width is not D gets a learned linear projection to D (one
per pair and side) before the L2 normalisation. When a tower is frozen its teacher is the
tower itself (no copy): then `*_teacher` and `*_tower` are the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.objectives.base import Objective, StepContext
from training.objectives.clip import ClipLoss
from training.towers.build import build_image_tower, build_text_tower

FEATURES = ("image", "text", "image_tower", "text_tower", "image_teacher", "text_teacher")
# "image" features come from the image stream, "text" ones from the text stream.
STREAM = {name: name.split("_")[0] for name in FEATURES}


def pair_name(source: str, target: str) -> str:
    return f"{source}-{target}"


def check_pairs(
    pairs: Sequence[tuple[str, str, float]], image_weights: str | None, text_weights: str | None
) -> None:
    """Every mistake in `objectives.cookie.pairs` that needs no model, as one ValueError."""
    if not pairs:
        raise ValueError("objectives.cookie.pairs is empty: name at least one (source, target)")
    seen = set()
    for i, (source, target, weight) in enumerate(pairs):
        where = f"objectives.cookie.pairs[{i}] ({source}, {target})"
        for name in (source, target):
            if name not in FEATURES:
                raise ValueError(
                    f"{where}: unknown feature {name!r} (known: {', '.join(FEATURES)})"
                )
        if source == target:
            raise ValueError(f"{where}: a feature against itself teaches nothing")
        if frozenset((source, target)) in seen:
            raise ValueError(f"{where}: this pair is named twice")
        seen.add(frozenset((source, target)))
        if weight < 0:
            raise ValueError(f"{where}: weight must be >= 0, got {weight}")
        for name in (source, target):
            pretrained = image_weights if STREAM[name] == "image" else text_weights
            if name.endswith("_teacher") and not pretrained:
                raise ValueError(
                    f"{where}: {name} is a frozen copy of the pretrained {STREAM[name]} tower, "
                    f"but the model has no pretrained {STREAM[name]} weights "
                    f"(model.options.{STREAM[name]}_weights)"
                )


class CookieObjective(Objective):
    """The configured knowledge-sharing losses; their pair weights multiply the unit's weight."""

    name = "cookie"

    def __init__(
        self,
        model: nn.Module,
        pairs: Sequence[tuple[str, str, float]],
        teachers: dict[str, nn.Module],
    ) -> None:
        super().__init__()
        self.pairs = [(s, t, float(w)) for s, t, w in pairs]
        self.loss = ClipLoss()
        self.teachers = nn.ModuleDict(teachers)  # stream -> frozen pretrained tower
        self.teachers.requires_grad_(False)
        dim = model.config.embed_dim
        widths = {"image": dim, "text": dim}
        widths |= {f"image_{k}": model.image_tower.width for k in ("tower", "teacher")}
        widths |= {f"text_{k}": model.text_tower.width for k in ("tower", "teacher")}
        self.projections = nn.ModuleDict()
        for source, target, _ in self.pairs:
            for role, name in (("source", source), ("target", target)):
                if widths[name] != dim:
                    proj = nn.Linear(widths[name], dim, bias=False)
                    nn.init.normal_(proj.weight, std=widths[name] ** -0.5)
                    self.projections[f"{pair_name(source, target)}-{role}"] = proj

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module) -> CookieObjective:
        pairs = cfg.objectives.cookie.pairs
        config = model.config
        check_pairs(pairs, config.image_weights, config.text_weights)
        needed = sorted({STREAM[n] for s, t, _ in pairs for n in (s, t) if n.endswith("_teacher")})
        teachers = {stream: build_teacher(config, stream) for stream in needed}
        return cls(model, pairs, {k: v for k, v in teachers.items() if v is not None})

    def train(self, mode: bool = True) -> CookieObjective:
        super().train(mode)
        self.teachers.eval()  # frozen: batch norm keeps the pretrained statistics
        return self

    def transient_prefixes(self) -> tuple[str, ...]:
        return ("teachers",)  # rebuilt from the pretrained weights, never checkpointed

    def loss_weight(self, loss_name: str) -> float:
        return next(w for s, t, w in self.pairs if pair_name(s, t) == loss_name)

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        losses = {}
        for source, target, _ in self.pairs:
            name = pair_name(source, target)
            a = self._embed(self.feature(ctx, source), f"{name}-source")  # (B, D)
            b = self._embed(self.feature(ctx, target), f"{name}-target")  # (B, D)
            losses[name] = self.loss(a, b, ctx.tau(), ctx.weights)
        return losses

    def _embed(self, feature: torch.Tensor, key: str) -> torch.Tensor:
        if key in self.projections:
            feature = self.projections[key](feature)
        return F.normalize(feature, dim=-1)

    def feature(self, ctx: StepContext, name: str) -> torch.Tensor:
        """One named feature of this step (the embeddings and tower outputs are the step's,
        computed once for every unit)."""
        if name == "image":
            return ctx.image()
        if name == "text":
            return ctx.text()
        stream, kind = name.split("_")
        if kind == "tower" or stream not in self.teachers:  # a frozen tower is its own teacher
            pooled = (ctx.image_features() if stream == "image" else ctx.text_features())["pooled"]
            return pooled if kind == "tower" else pooled.detach()
        batch, teacher = ctx.batch, self.teachers[stream]
        with torch.no_grad():
            if stream == "image":
                return teacher(batch["pixels"])["pooled"]
            return teacher(batch["input_ids"], batch["attention_mask"])["pooled"]


def build_teacher(config: Any, stream: str) -> nn.Module | None:
    """The frozen pretrained tower of `stream`, or None when the model's own tower is frozen
    (then it is the teacher). Built from the weights spec, so a resumed run gets it too."""
    if getattr(config, f"{stream}_trainable_blocks") == 0:
        return None
    tower = build_image_tower(config) if stream == "image" else build_text_tower(config)
    return tower.eval().requires_grad_(False)
