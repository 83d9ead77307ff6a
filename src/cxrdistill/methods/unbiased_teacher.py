"""Unbiased Teacher for detection (Liu et al., ICLR 2021: an EMA teacher's hard pseudo-boxes ≥ τ on a
weak view train the student's strong view) and the Soft-Teacher-style variant (Xu et al., ICCV 2021)
adapted to RetinaNet.

Until issue 19 this recipe was registered as ``mean_teacher``; that name now belongs to the
consistency Mean Teacher of Tarvainen & Valpola (``methods/mean_teacher.py``). Configs that meant
this recipe must say ``method.name: unbiased_teacher`` (docs/fidelity.md, "Renamed recipes").

1. **Burn-in**: the shared supervised stage on D_B (`kit.supervised_stage`)      stage ``supervised``
2. **Mean teacher**: the teacher is the EMA of the student (`engine.ema.EMATeacher`, decay 0.999).
   Every step, each unlabeled image gets a weak and a strong view (`data.views.random_view`);
   the teacher detects on the weak view, the boxes scoring ≥ τ are **projected into the strong
   view** (`project_boxes` through the recorded ``weak.into(strong)`` matrix) and the student learns
   them on the strong view: L = L_s + λ_u · L_u                                   stage ``mean_teacher``

``soft_teacher: true`` (Soft Teacher's "soft teacher" mechanism): an anchor the pseudo-boxes leave
negative is weighted in L_u's classification loss by the teacher's **background score** on that
anchor, ``1 − max_c p_teacher(a, c)``, the teacher evaluated on the student's own (strong) view so
the anchors coincide; the weights of the negatives are normalised to mean 1 (Soft Teacher's
Eq. 3 normalises by the weight sum). A likely-missed object thus costs the student little.
Soft Teacher's thresholds: τ = 0.9, λ_u = 4; Unbiased Teacher: τ = 0.7 (our default), λ_u = 4.

Box jittering (Soft Teacher Sec. 3.3, ``box_jitter: true``, on in ``soft_teacher``): the regression
pseudo-boxes are a subset of the classification ones. Each pseudo-box is jittered ``jitter_copies``
times (offsets ~ N(0, (jitter_scale · w/h)²)); the teacher's regression refines every copy
(RetinaNet has no RoI head: the copy is refined by the IoU-weighted mean of the teacher's decoded
boxes at the 9 anchors that overlap it most, on the student's view); a box whose refined copies scatter by more than
``jitter_threshold`` (mean of the four coordinates' standard deviations over the box's height /
width) is left out of L_u's box loss. Soft Teacher: 10 copies, scale 0.06, threshold 0.02.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from cxrdistill.config import RunConfig
from cxrdistill.data.study import StudyData
from cxrdistill.data.views import View, ViewConfig, project_boxes
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.ema import EMATeacher
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.methods.kit import (
    Augment,
    SemiBatch,
    burn_in,
    evaluate_against_burn_in,
    module_as,
    semi_loader,
    semi_losses,
    split_train,
    step_generator,
    view_config,
)
from cxrdistill.methods.offline import select_pseudo_labels, stored_detections
from cxrdistill.methods.registry import register_method
from cxrdistill.models.detector import DetectorOutput, RetinaNet
from cxrdistill.models.losses import sigmoid_focal_loss
from cxrdistill.pseudo.selection import PseudoSelection
from cxrdistill.pseudo.thresholds import filter_detections


class UnbiasedTeacherParams(BaseModel):
    """`method.params` of ``unbiased_teacher`` (and ``soft_teacher``)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.7, ge=0.0, le=1.0)
    """τ on the teacher's weak-view detections (Unbiased Teacher 0.7; Soft Teacher 0.9)."""
    unsup_weight: float = Field(4.0, ge=0.0)
    """λ_u (Unbiased Teacher and Soft Teacher: 4)."""
    ema_decay: float = Field(0.999, ge=0.0, le=1.0)
    soft_teacher: bool = False
    """Weight the negatives of L_u by the teacher's background score (module docstring)."""
    box_jitter: bool = False
    """Soft Teacher's box-jitter filter of the regression pseudo-boxes (module docstring)."""
    jitter_copies: int = Field(10, ge=2)
    jitter_scale: float = Field(0.06, gt=0.0)
    jitter_threshold: float = Field(0.02, gt=0.0)
    pseudo: PseudoSelection = Field(default_factory=PseudoSelection)
    """Pseudo-label selection (``fixed``: τ; ``precision@P`` / ``topk_per_class``: per-class thresholds
    chosen once with the burned-in model) and what a collapse of them does."""
    burn_in_steps: int | None = Field(None, ge=0)
    """Supervised steps before the teacher is made (None: half of `train.max_steps`)."""
    augment: Augment = "flip"
    """Labeled images' view."""
    unlabeled_supervision: list[str] = Field(default_factory=lambda: ["image", "none"])
    train_split: str = "train"
    eval_split: str = "test"
    n_boot: int = Field(1000, ge=0)


# ============================================================================ the mechanisms


@torch.no_grad()
def teacher_targets_in_strong_view(teacher: RetinaNet | EMATeacher, weak: View, strong: View,
                                   threshold: float | Tensor) -> list[dict[str, Tensor]]:
    """The teacher's boxes (score ≥ τ) on the weak view, projected into the strong view.

    Returns per image ``{"boxes": (K, 4) strong-view xyxy, "labels": (K,), "scores": (K,)}``; a box
    that leaves the strong view (less than half visible) is dropped with its label.
    """
    module = module_as(teacher.module, RetinaNet) if isinstance(teacher, EMATeacher) else teacher
    dets = filter_detections(module.predict(weak.images), threshold)
    size = (int(strong.images.shape[-2]), int(strong.images.shape[-1]))
    out = []
    for det, matrix in zip(dets, weak.into(strong)):
        boxes, keep = project_boxes(det["boxes"], matrix, size)
        out.append({"boxes": boxes, "labels": det["labels"][keep], "scores": det["scores"][keep]})
    return out


def soft_teacher_cls_loss(student: RetinaNet, out: DetectorOutput, targets: Sequence[dict[str, Tensor]],
                          teacher_background: Tensor) -> Tensor:
    """Focal classification loss whose negative anchors are weighted by the teacher's background score.

    ``teacher_background (B, A)`` in [0, 1] (``1 − max_c p_teacher``) on the same anchors as ``out``.
    Positives and ignored anchors keep weight 1 / 0; the negatives' weights are normalised to mean 1.
    Normalised by the number of positives, like `RetinaNet.loss`; with a constant background score
    it equals `RetinaNet.loss(...)["cls"]`.
    """
    logits = out.cls_logits.float()
    matches = student.match(out, targets)
    positive = torch.stack([m.positive for m in matches])
    ignore = torch.stack([m.ignore for m in matches])
    matched = torch.stack([m.matched_idx for m in matches]).clamp(min=0)
    target = torch.zeros_like(logits)
    for b, t in enumerate(targets):
        if t["labels"].numel():
            labels = t["labels"].to(logits.device)[matched[b]]
            target[b].scatter_(1, labels[:, None], positive[b, :, None].to(logits.dtype))
    focal = sigmoid_focal_loss(logits, target, student.focal_alpha, student.focal_gamma).sum(-1)  # (B, A)
    negative = ~positive & ~ignore
    weight = torch.where(positive, torch.ones_like(focal), torch.zeros_like(focal))
    bg = teacher_background.to(focal)
    if negative.any():
        weight = torch.where(negative, bg / bg[negative].mean().clamp(min=1e-6), weight)
    return (focal * weight.detach()).sum() / positive.sum().clamp(min=1).to(focal)


@torch.no_grad()
def box_jitter_uncertainty(module: RetinaNet, teacher_out: DetectorOutput, boxes: list[Tensor], copies: int,
                           scale: float, generator: torch.Generator, neighbours: int = 9) -> list[Tensor]:
    """Soft Teacher's box-regression variance of each pseudo-box, on a one-stage detector.

    ``boxes``: per image ``(K, 4)`` xyxy on the view ``teacher_out`` was computed on. Each box is
    jittered ``copies`` times (offsets ~ N(0, (scale · w/h)²)); each copy is refined by the teacher's
    regression at the ``neighbours`` anchors that overlap it most, averaged with IoU weights (a
    one-stage stand-in for Soft Teacher's RoI head refining the jittered box). Returns per image ``(K,)``: the mean over
    the four coordinates of the refined copies' standard deviation divided by the box's height
    (y) / width (x). 0 for a box the teacher regresses to the same place from every copy.
    """
    from monai.data.box_utils import box_iou

    out = []
    anchors = teacher_out.anchors.float()
    for b, box in enumerate(boxes):
        if box.numel() == 0:
            out.append(box.new_zeros(0))
            continue
        box = box.float()
        size = torch.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], dim=1).clamp(min=1e-3)  # (K, 2) w, h
        per_coord = size.repeat(1, 2)  # (K, 4): w, h, w, h
        noise = torch.randn(copies, *box.shape, generator=generator).to(box)
        jittered = box[None] + noise * scale * per_coord[None]  # (copies, K, 4)
        flat = jittered.reshape(-1, 4)
        iou, near = box_iou(flat, anchors).topk(  # type: ignore[union-attr]  # monai: ndarray | Tensor; tensors in, a tensor out
min(neighbours, len(anchors)), dim=1)  # (copies * K, n)
        decoded = module.box_coder.decode_single(teacher_out.box_deltas[b].float()[near.reshape(-1)],
                                                 anchors[near.reshape(-1)]).reshape(*near.shape, 4)
        weight = iou / iou.sum(dim=1, keepdim=True).clamp(min=1e-12)
        refined = (weight[..., None] * decoded).sum(dim=1).reshape(copies, -1, 4)
        out.append((refined.std(dim=0) / per_coord).mean(dim=1))
    return out


# ============================================================================ the recipe


def _run(cfg: RunConfig, params: UnbiasedTeacherParams, ctx: RunContext, title: str) -> dict[str, float]:
    data = StudyData.from_config(cfg.data)
    sets = split_train(data, params.train_split, params.unlabeled_supervision, need_unlabeled=title)
    t = cfg.train
    held_out = data.dataset(params.eval_split)
    start = burn_in(ctx, data, params.burn_in_steps, params.augment, params.train_split, held_out,
                    eval_split=params.eval_split, n_boot=params.n_boot)
    student = start.student
    thresholds: float | Tensor = params.threshold
    if start.stage is not None:  # τ, or per-class thresholds chosen once with the burned-in model
        dets = stored_detections(ctx, student, sets, 0, fresh=start.stage.fresh, root="pseudo/burn_in")
        thresholds = select_pseudo_labels(ctx, student, sets, data, dets, params.threshold, params.pseudo,
                                          name="burn-in model")[0].thresholds
    student.train()
    teacher = EMATeacher(student, decay=params.ema_decay)  # from the burned-in student
    loader, sampler = semi_loader(ctx, sets, t.seed + 1)
    weak_view = view_config(params.augment)
    trainer = ctx.trainer("mean_teacher")  # the stage keeps its name: earlier runs resume
    student.train()

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        semi = SemiBatch.split(batch)
        labeled, unlabeled = semi.labeled, semi.unlabeled
        labeled.weak = labeled.view(weak_view, step_generator(t.seed, step))
        sup = student.loss(student(labeled.weak.images), labeled.weak.targets)
        generator = step_generator(t.seed, step, stream=1)  # the weak view, then the strong one
        unlabeled.weak = unlabeled.view(ViewConfig.weak(), generator)
        unlabeled.strong = unlabeled.view(ViewConfig.martins_silva(), generator)
        pseudo = teacher_targets_in_strong_view(teacher, unlabeled.weak, unlabeled.strong, thresholds)
        out = student(unlabeled.strong.images)
        hard = [{"boxes": p["boxes"], "labels": p["labels"]} for p in pseudo]
        unsup = student.loss(out, hard)
        teacher_out = None
        if params.soft_teacher or params.box_jitter:
            with torch.no_grad():
                teacher_out = teacher(unlabeled.strong.images)
        if params.soft_teacher and teacher_out is not None:  # set above whenever soft_teacher
            probs = torch.sigmoid(teacher_out.cls_logits.float())
            unsup["cls"] = soft_teacher_cls_loss(student, out, hard, 1 - probs.amax(-1))
        if params.box_jitter and teacher_out is not None:  # set above whenever box_jitter
            spread = box_jitter_uncertainty(module_as(teacher.module, RetinaNet), teacher_out, [h["boxes"] for h in hard],
                                            params.jitter_copies, params.jitter_scale,
                                            step_generator(t.seed, step, stream=2))
            reg = [{"boxes": h["boxes"][u < params.jitter_threshold], "labels": h["labels"][u < params.jitter_threshold]}
                   for h, u in zip(hard, spread, strict=True)]
            unsup["box"] = student.loss(out, reg)["box"]
            n_all = sum(len(h["labels"]) for h in hard)
            trainer.log_metrics({"jitter_kept_fraction": sum(len(r["labels"]) for r in reg) / max(n_all, 1)})
        trainer.log_counts("pseudo_boxes", {data.class_names[c]: int(sum((p["labels"] == c).sum() for p in pseudo))
                                            for c in range(data.num_classes)})
        trainer.log_metrics({"log_pseudo_boxes_per_image": sum(len(p["labels"]) for p in pseudo) / max(len(pseudo), 1)})
        return semi_losses(sup, unsup, params.unsup_weight)

    trainer.fit(step_fn, {"student": student, "teacher": teacher}, build_optimizer(student.parameters(), t), loader,
                max(t.max_steps - start.steps, 1), sampler=sampler, on_step_end=lambda _: teacher.update(student))
    # the final (EMA) model − the burned-in model it started from, on the same test images
    return evaluate_against_burn_in(ctx, module_as(teacher.module, RetinaNet), start, held_out, split=params.eval_split,
                                    n_boot=params.n_boot, title=title, class_names=data.class_names)


@register_method("unbiased_teacher", UnbiasedTeacherParams)
def run(cfg: RunConfig, params: UnbiasedTeacherParams, ctx: RunContext) -> dict[str, float]:
    """Burn-in on D_B, then the EMA teacher's projected weak-view boxes train the student's strong view."""
    return _run(cfg, params, ctx, "Soft Teacher (RetinaNet)" if params.soft_teacher else "Unbiased Teacher")


class SoftTeacherParams(UnbiasedTeacherParams):
    """`unbiased_teacher` with the background weighting and the box-jitter filter on, Soft Teacher's τ = 0.9."""

    soft_teacher: bool = True
    box_jitter: bool = True
    threshold: float = Field(0.9, ge=0.0, le=1.0)


@register_method("soft_teacher", SoftTeacherParams)
def run_soft(cfg: RunConfig, params: SoftTeacherParams, ctx: RunContext) -> dict[str, float]:
    """Soft-Teacher-style mean teacher on RetinaNet (teacher-score-weighted background loss)."""
    return _run(cfg, params, ctx, "Soft Teacher (RetinaNet)")


__all__ = ["SoftTeacherParams", "UnbiasedTeacherParams", "box_jitter_uncertainty", "run", "run_soft",
           "soft_teacher_cls_loss", "teacher_targets_in_strong_view"]
