"""The `anchor` unit: keep what the model knew at step 0 while it learns a new gallery.

Training on one small domain pulls the joint space toward it and away from what the
pretrained towers knew (with the semantic branch: ConSE's zero-shot ranking). This unit is
knowledge distillation from the step-0 model (Hinton et al. 2015; "learning without
forgetting", Li & Hoiem 2016), in COOKIE's knowledge-sharing spirit: a frozen copy of the
projections as they were at step 0 scores the batch, and the online model's in-batch
image-to-text and text-to-image distributions are pulled toward the copy's (KL, both ways).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from training.objectives.base import Objective, StepContext, weighted_mean


def distill_kl(
    student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) per row of (B, B) logits, averaged."""
    log_p = F.log_softmax(teacher.float(), dim=1)
    log_q = F.log_softmax(student.float(), dim=1)
    per_row = (log_p.exp() * (log_p - log_q)).sum(1)  # (B,)
    return weighted_mean(per_row, weights)


class AnchorObjective(Objective):
    """Distillation toward the frozen step-0 projections (saved with the trainer state, so
    a resumed run keeps the same anchor)."""

    name = "anchor"

    def __init__(self, model: nn.Module, teacher_temperature: float) -> None:
        super().__init__()
        if model.shared is not None:
            raise ValueError("objectives.anchor does not apply to COOKIE's shared transformer")
        self.teacher = nn.ModuleDict(
            {
                name: copy.deepcopy(getattr(model, name)).requires_grad_(False)
                for name in ("image_proj", "text_proj", "semantic_proj")
                if getattr(model, name, None) is not None
            }
        )
        self.teacher_temperature = teacher_temperature

    @classmethod
    def from_config(cls, cfg, model: nn.Module) -> AnchorObjective:
        return cls(model, cfg.objectives.anchor.teacher_temperature)

    def teacher_embeddings(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The step-0 model's (image (B, D), text (B, D)) unit embeddings of the batch."""
        model, image_features = ctx.model, ctx.image_features()
        with torch.no_grad():
            image = self.teacher["image_proj"](image_features["pooled"])
            if "semantic_proj" in self.teacher:
                semantic = model.semantic(image_features["pooled"])
                image = image + self.teacher["semantic_proj"](semantic)
            text = self.teacher["text_proj"](ctx.text_features()["pooled"])
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        image_t, text_t = self.teacher_embeddings(ctx)
        teacher = image_t @ text_t.T / self.teacher_temperature  # (B, B)
        student = ctx.image() @ ctx.text().T / ctx.tau()  # (B, B)
        i2t = distill_kl(student, teacher, ctx.weights)
        t2i = distill_kl(student.T, teacher.T, ctx.weights)
        return {"anchor": (i2t + t2i) / 2}
