"""Mean Teacher for detection: Tarvainen & Valpola (NeurIPS 2017) consistency on RetinaNet's anchors.

The teacher is the EMA of the student's weights (decay α); every image of a batch — labeled and
unlabeled — is seen by both under the **same geometry** (one random flip, so the anchors coincide)
and **different noise** (independent intensity jitter and Gaussian noise per model, the paper's
"input augmentation" η, η'). The consistency cost is the squared difference of the two models'
per-anchor class probabilities (the paper's MSE of the softmax outputs; sigmoids here, one per class),
summed over classes and averaged over anchors and images, weighted by ``w(t) = w_max ·
exp(−5 (1 − t/T)²)`` (the paper's sigmoid ramp-up over the first T steps):

    L = L_sup(student, D_B) + w(t) · mean_anchors ‖σ(student) − σ(teacher)‖²      (teacher detached)

1. **Burn-in**: the shared supervised stage on D_B (`kit.supervised_stage`, stage ``supervised``; the paper has none, the detection
   mean teachers that followed it do; ``burn_in_steps: 0`` switches it off).
2. **Mean teacher** (stage ``mean_teacher``).

``box_weight > 0`` adds the squared difference of the box deltas, weighted per anchor by the
teacher's foreground probability (not in the paper, which is a classifier). The earlier recipe of
this name — hard pseudo-boxes ≥ τ, λ_u = 4 — is ``unbiased_teacher`` (docs/fidelity.md).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from cxrdistill.config import RunConfig
from cxrdistill.data.study import StudyData
from cxrdistill.data.views import ViewConfig, intensity_jitter, random_view
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.ema import EMATeacher
from cxrdistill.engine.optim import build_optimizer, ramp_up
from cxrdistill.methods.kit import (
    burn_in,
    evaluate_against_burn_in,
    module_as,
    semi_loader,
    semi_losses,
    split_train,
    step_generator,
)
from cxrdistill.methods.registry import register_method
from cxrdistill.models.detector import DetectorOutput, RetinaNet

_UNBIASED_ONLY = ("threshold", "unsup_weight", "soft_teacher", "box_jitter")


class MeanTeacherParams(BaseModel):
    """`method.params` of ``mean_teacher`` (the consistency mean teacher)."""

    model_config = ConfigDict(extra="forbid")

    consistency_weight: float = Field(10.0, ge=0.0)
    """w_max of the consistency cost."""
    rampup_fraction: float = Field(0.25, ge=0.0, le=1.0)
    """Fraction of the mean-teacher stage over which w(t) ramps up (the paper's sigmoid ramp-up)."""
    ema_decay: float = Field(0.99, ge=0.0, le=1.0)
    """α (the paper: 0.99 during ramp-up, 0.999 after; one value here)."""
    noise: float = Field(0.5, ge=0.0, le=1.0)
    """Strength of each model's own intensity jitter + Gaussian noise (`data.views.intensity_jitter`)."""
    flip_p: float = Field(0.5, ge=0.0, le=1.0)
    """Probability of the horizontal flip both models share."""
    box_weight: float = Field(0.0, ge=0.0)
    """Weight of the foreground-weighted box-delta consistency (0: the paper's classification-only cost)."""
    burn_in_steps: int | None = Field(None, ge=0)
    """Supervised steps before the teacher is made (None: half of `train.max_steps`)."""
    unlabeled_supervision: list[str] = Field(default_factory=lambda: ["image", "none"])
    train_split: str = "train"
    eval_split: str = "test"
    n_boot: int = Field(1000, ge=0)
    # The parameters of the renamed pseudo-box recipe are declared only to reject them with a
    # message naming `unbiased_teacher` (instead of "unknown parameter").
    threshold: None = None
    unsup_weight: None = None
    soft_teacher: None = None
    box_jitter: None = None

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(data.get(key) is not None for key in _UNBIASED_ONLY):
            raise ValueError("these are parameters of the pseudo-box recipe, which was registered as "
                             "`mean_teacher` until issue 19 and is now `unbiased_teacher`; set "
                             "method.name: unbiased_teacher (docs/fidelity.md)")
        return data


def consistency_loss(student: DetectorOutput, teacher: DetectorOutput, box_weight: float = 0.0) -> Tensor:
    """Per-anchor Mean Teacher cost: ``mean_{b, a} Σ_c (σ(s) − σ(t))²`` (teacher detached).

    ``box_weight > 0`` adds ``box_weight · Σ p_fg(t) ‖Δs − Δt‖² / Σ p_fg(t)`` over the anchors, with
    ``p_fg = max_c σ(t)``. Zero when both outputs are equal.
    """
    s_prob = torch.sigmoid(student.cls_logits.float())
    t_prob = torch.sigmoid(teacher.cls_logits.float()).detach()
    loss = (s_prob - t_prob).pow(2).sum(dim=-1).mean()
    if box_weight > 0:
        fg = t_prob.amax(dim=-1)  # (B, A)
        diff = (student.box_deltas.float() - teacher.box_deltas.float().detach()).pow(2).sum(dim=-1)
        loss = loss + box_weight * (fg * diff).sum() / fg.sum().clamp(min=1e-6)
    return loss


def noisy_pair(images: Tensor, strength: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(student input, teacher input): ``images (B, 1, H, W)`` under two independent noise draws."""
    return intensity_jitter(images, strength, generator), intensity_jitter(images, strength, generator)


@register_method("mean_teacher", MeanTeacherParams)
def run(cfg: RunConfig, params: MeanTeacherParams, ctx: RunContext) -> dict[str, float]:
    """Burn-in on D_B, then supervised loss + ramped per-anchor consistency to the EMA teacher."""
    data = StudyData.from_config(cfg.data)
    sets = split_train(data, params.train_split, params.unlabeled_supervision, need_unlabeled="mean_teacher")
    t = cfg.train
    held_out = data.dataset(params.eval_split)
    start = burn_in(ctx, data, params.burn_in_steps, "flip", params.train_split, held_out,
                    eval_split=params.eval_split, n_boot=params.n_boot)
    student = start.student
    student.train()
    teacher = EMATeacher(student, decay=params.ema_decay)
    loader, sampler = semi_loader(ctx, sets, t.seed + 1)
    steps = max(t.max_steps - start.steps, 1)
    ramp = round(params.rampup_fraction * steps)
    geometry = ViewConfig(flip_p=params.flip_p)
    trainer = ctx.trainer("mean_teacher")
    student.train()

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        view = random_view(batch["image"], geometry, step_generator(t.seed, step), batch["boxes"], batch["labels"])
        images = view.images
        s_in, t_in = noisy_pair(images, params.noise, step_generator(t.seed, step, stream=1))
        out = student(s_in)
        sup = student.loss(out, view.targets, weights=batch["has_boxes"].to(images))
        with torch.no_grad():
            t_out = teacher(t_in)
        weight = params.consistency_weight * ramp_up(step, ramp)
        return {**semi_losses(sup, {"consistency": consistency_loss(out, t_out, params.box_weight)}, weight),
                "log_w": torch.tensor(weight)}

    trainer.fit(step_fn, {"student": student, "teacher": teacher}, build_optimizer(student.parameters(), t), loader,
                steps, sampler=sampler, on_step_end=lambda _: teacher.update(student))
    return evaluate_against_burn_in(ctx, module_as(teacher.module, RetinaNet), start, held_out, split=params.eval_split,
                                    n_boot=params.n_boot, title="Mean Teacher (consistency)",
                                    class_names=data.class_names)


__all__ = ["MeanTeacherParams", "consistency_loss", "noisy_pair", "run"]
