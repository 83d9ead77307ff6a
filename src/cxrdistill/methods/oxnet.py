"""OXnet: deep omni-supervised thoracic disease detection (Luo et al., MICCAI 2021).

Three kinds of training image (Sec. 2): D_F with boxes (supervision ``"box"``), D_W with
image-level labels (``"image"``) and D_U with nothing (``"none"``).

1. **Base detector** (stage ``base``): RetinaNet trained on D_F with the focal and box losses
   (the shared supervised stage, :func:`~cxrdistill.methods.kit.supervised_stage`: the
   `supervised_detector` checkpoint at the same seed, steps and view).
2. **Omni-supervised training** (stage ``oxnet``), fine-tuned from the base detector:

   - D_F keeps RetinaNet's supervised loss.
   - **DAA** (Sec. 2.1): a global head (1x1 conv on the backbone map M) whose class maps X are
     pooled with the local attention of the detector's classification branch (Eqs. 2-3); BCE
     (Eq. 1) on D_W ∪ D_F. The gradient reaches the local branch through the attention.
   - **GPA** (Sec. 2.2): class features F_c = sum M ⊙ R_c (Eq. 4), prototypes updated by
     confidence-weighted batch means (Eq. 5, beta = 0 then 0.7), intra-class and inter-class
     (margin delta = 1) losses (Eq. 6) on D_W ∪ D_F.
   - **SFL** (Sec. 2.3): a mean teacher (EMA, lambda = 0.99) of the detector; the soft focal loss
     (Eq. 8, alpha = 0.9, eps = 0.05, gamma = 2) between every anchor's class probability of the
     student and of the teacher on D_U ∪ D_W, normalised by the number of anchors matched to the
     teacher's boxes (RetinaNet's normalisation).

   The total loss is the plain sum (Sec. 2.4).

Decisions the paper leaves open (all switchable, see :class:`OXnetParams`): the teacher sees the
flipped image, the student the same view with intensity jitter (``student_intensity``); GPA uses
the image labels (a class feature of image k counts for class c when k is labelled with c,
``gpa_use_labels``); teacher boxes are its detections above 0.5 (``teacher_box_thresh``).
Departures of the public code that are *not* followed: it distils only the teacher boxes whose
class is annotated on the image (so D_U adds nothing); here every anchor of D_U ∪ D_W is distilled.
Its box-regression distillation is available as ``distill_boxes`` (off by default).

Switches for the paper's rows: ``global_head`` daa / gap (the "+ MT" multi-task head) / none,
``gpa``, ``distill`` sfl / mse (Mean Teacher's consistency) / none; ``base_only`` stops after stage 1
(the RetinaNet row). Annotation granularity (Table 2): ``data.boxed_fraction`` /
``data.weak_fraction``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from cxrdistill.config import RunConfig
from cxrdistill.data.dataset import CXRDataset
from cxrdistill.data.study import StudyData
from cxrdistill.data.views import intensity_jitter, random_view
from cxrdistill.engine.checkpoint import load_module_weights
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.ema import EMATeacher
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.errors import ConfigError
from cxrdistill.eval.classification import bootstrap_indices
from cxrdistill.eval.detection import (
    OXNET_IOUS,
    CocoParams,
    accumulate,
    match_detections,
)
from cxrdistill.eval.runs import evaluate_detector, ground_truth_of, write_metrics
from cxrdistill.methods.kit import (
    boxed_indices,
    build_detector,
    headline,
    labeled_loader,
    module_as,
    prefixed,
    print_metrics,
    stage_metrics,
    step_generator,
    supervised_stage,
    view_config,
)
from cxrdistill.methods.registry import register_method
from cxrdistill.models.detector import DetectorOutput, RetinaNet
from cxrdistill.models.factory import export_model
from cxrdistill.models.oxnet_heads import GlobalBranch, GlobalOutput
from cxrdistill.pseudo.soft_focal import soft_focal_loss


class OXnetParams(BaseModel):
    """``method.params`` of OXnet; defaults are the paper's values (Sec. 2.4)."""

    model_config = ConfigDict(extra="forbid")

    global_head: Literal["daa", "gap", "none"] = "daa"
    """Image-level head on D_W ∪ D_F: DAA pooling (Eq. 3), global average pooling (the "+ MT"
    multi-task baselines of Table 1) or none."""
    gpa: bool = True
    """Global prototype alignment (Sec. 2.2); needs ``global_head: daa``."""
    distill: Literal["sfl", "mse", "none"] = "sfl"
    """Teacher-student loss on D_U ∪ D_W: soft focal loss (Eq. 8), Mean Teacher's squared error of
    the probabilities (Table 1's "Mean Teacher"), or none."""
    distill_boxes: bool = False
    """Also distil box regression on anchors matched to the teacher's boxes (public code; not in the paper)."""
    base_only: bool = False
    """Stop after the base RetinaNet on D_F (Table 1, first row)."""
    level_reduce: Literal["select", "max"] = "select"
    """Eq. (2): per class the pyramid level with the highest peak (paper, public code), or the
    element-wise maximum over levels."""
    gpa_use_labels: bool = True
    """GPA counts image k's feature F_c for class c only when k is labelled with c; False: every
    labelled image, weighted by its confidence alone."""
    prototype_momentum: float = Field(0.7, ge=0.0, lt=1.0)
    """beta of Eq. (5) after a class's first update (0 at the first)."""
    margin: float = Field(1.0, gt=0.0)
    """delta of Eq. (6)."""
    gpa_distance: Literal["mean", "sum"] = "mean"
    """Scale of Eq. (6)'s ``||F - P||^2``: ``mean`` over the channels (the authors' code, so delta = 1
    is in range at any width) or ``sum`` (the paper-literal squared L2 norm; at width 8 no pair
    falls inside the margin and L_Inter is 0). See docs/fidelity.md."""
    ema_decay: float = Field(0.99, ge=0.0, le=1.0)
    """lambda of the mean teacher (Sec. 2.3)."""
    sfl_alpha: float = Field(0.9, ge=0.0)
    sfl_eps: float = Field(0.05, ge=0.0)
    sfl_gamma: float = Field(2.0, ge=0.0)
    teacher_box_thresh: float = Field(0.5, gt=0.0, lt=1.0)
    """Teacher detections above this score are its boxes (they set the SFL normaliser)."""
    bce_weight: float = Field(1.0, ge=0.0)
    gpa_weight: float = Field(1.0, ge=0.0)
    distill_weight: float = Field(1.0, ge=0.0)
    student_intensity: float = Field(0.25, ge=0.0, le=1.0)
    """Intensity jitter of the student's view (the teacher sees the un-jittered view); 0: none."""
    augment: Literal["flip", "none", "strong"] = "flip"
    """Geometric view shared by teacher and student (the paper follows MMT-PSM's augmentation)."""
    base_steps: int | None = Field(None, ge=0)
    """Optimizer steps of the base detector (None: ``train.max_steps``)."""
    steps: int | None = Field(None, ge=0)
    """Optimizer steps of the omni-supervised stage (None: ``train.max_steps``)."""
    lr: float | None = Field(None, gt=0.0)
    """Learning rate of the omni-supervised stage, which fine-tunes the base detector (None: ``train.lr``)."""
    base_checkpoint: Path | None = None
    """Start from this base detector (a ``checkpoints/base/last.pt``) instead of training one."""
    other_per_batch: int | None = Field(None, ge=1)
    """D_W ∪ D_U images per batch next to ``train.batch_size`` D_F images (None:
    ``train.unlabeled_batch_size``, or ``train.batch_size`` when that is 0)."""
    eval_split: str = "test"
    n_boot: int = Field(1000, ge=0)
    """Bootstrap replicates (over images) of the mAP and AUROC CIs."""


# --------------------------------------------------------------------------------- the pieces


def distillation_set(params: OXnetParams) -> tuple[str, ...]:
    """Supervision kinds the stage-2 losses use besides D_F: D_W for the global head, D_U ∪ D_W for distillation."""
    kinds: set[str] = set()
    if params.global_head != "none":
        kinds.add("image")
    if params.distill != "none":
        kinds |= {"image", "none"}
    return tuple(sorted(kinds))


def global_losses(branch: GlobalBranch, out: DetectorOutput, image_labels: Tensor, labelled: Tensor,
                  params: OXnetParams) -> dict[str, Tensor]:
    """BCE (Eq. 1) of the global head and, with GPA, the prototype update (Eq. 5) and Eq. (6) losses.

    ``image_labels (B, N)`` multi-hot, ``labelled (B,)`` bool (D_W ∪ D_F). BCE sums over classes and
    averages over the labelled images; the GPA losses average over their valid pairs.
    """
    g: GlobalOutput = branch(out)
    y = image_labels.to(g.logits.dtype)
    weight = labelled.to(g.logits.dtype)
    bce = F.binary_cross_entropy_with_logits(g.logits, y, reduction="none").sum(dim=1)
    losses = {"bce": params.bce_weight * (bce * weight).sum() / weight.sum().clamp(min=1)}
    if params.gpa and g.features is not None:
        members = (y if params.gpa_use_labels else torch.ones_like(y)) * weight[:, None]
        confidence = torch.sigmoid(g.logits.detach())
        branch.prototypes.update(g.features, confidence * members)
        losses["intra"] = params.gpa_weight * branch.prototypes.intra_loss(g.features, members)
        losses["inter"] = params.gpa_weight * branch.prototypes.inter_loss(g.features, members)
        losses["log_gpa_intra"] = losses["intra"].detach() / max(params.gpa_weight, 1e-12)
        losses["log_gpa_inter"] = losses["inter"].detach() / max(params.gpa_weight, 1e-12)
        losses["log_gpa_inside_margin"] = branch.prototypes.inside_margin_fraction(g.features, members)
    return losses


def distillation_losses(student: RetinaNet, out: DetectorOutput, teacher: EMATeacher, teacher_images: Tensor,
                        chosen: Tensor, params: OXnetParams) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """SFL (Eq. 8) or Mean Teacher's MSE on every anchor of the ``chosen (B,)`` images.

    The teacher sees ``teacher_images[chosen]``; its detections above ``teacher_box_thresh`` are
    matched to the anchors and the number of matched anchors (at least 1) normalises the loss.
    Returns the losses and the teacher's boxes (for logging).
    """
    with torch.no_grad():
        t_out = teacher(teacher_images[chosen])
        t_probs = torch.sigmoid(t_out.cls_logits.float())
        t_boxes = module_as(teacher.module, RetinaNet).decode(t_out, score_thresh=params.teacher_box_thresh)
    matches = student.match(t_out, t_boxes)
    normaliser = torch.stack([m.positive.sum() for m in matches]).sum().to(t_probs)
    s_logits = out.cls_logits[chosen].float()
    if params.distill == "sfl":
        loss = soft_focal_loss(s_logits, t_probs, params.sfl_alpha, params.sfl_eps, params.sfl_gamma, normaliser)
    else:
        loss = (torch.sigmoid(s_logits) - t_probs).pow(2).sum() / normaliser.clamp(min=1)
    losses = {params.distill: params.distill_weight * loss, "log_teacher_matched_anchors": normaliser}
    if params.distill_boxes:
        targets: list[dict[str, Tensor]] = []
        it = iter(t_boxes)
        for flag in chosen.tolist():
            det = next(it) if flag else None
            targets.append({"boxes": det["boxes"], "labels": det["labels"]} if det is not None else
                           {"boxes": out.anchors.new_zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long,
                                                                                        device=out.anchors.device)})
        losses["distill_box"] = params.distill_weight * student.loss(out, targets, weights=chosen.float())["box"]
    return losses, t_boxes





def omni_supervised(cfg: RunConfig, params: OXnetParams, ctx: RunContext, train: CXRDataset, student: RetinaNet,
                    class_names: list[str]) -> tuple[GlobalBranch | None, EMATeacher | None]:
    """Stage 2: fine-tune the base detector with the enabled OXnet losses (Sec. 2.4)."""
    if params.gpa and params.global_head != "daa":
        raise ConfigError("method.params.gpa: GPA needs the DAA attention (global_head: daa); set gpa: false")
    kinds = distillation_set(params)
    boxed = boxed_indices(train)
    others = [i for i, im in enumerate(train.images) if im.supervision in kinds]
    branch = None
    if params.global_head != "none":
        channels: list[int] = student.backbone.out_channels  # type: ignore[assignment]  # nn.Module.__getattr__ types it Tensor | Module
        branch = GlobalBranch(channels[-1], student.num_classes, pooling=params.global_head,
                              level_reduce=params.level_reduce, momentum=params.prototype_momentum,
                              margin=params.margin, distance=params.gpa_distance)
    teacher = EMATeacher(student, decay=params.ema_decay) if params.distill != "none" else None
    per_other = params.other_per_batch or cfg.train.unlabeled_batch_size or cfg.train.batch_size
    loader, sampler = labeled_loader(train, boxed, others, cfg.train.batch_size, per_other if others else 0,
                                     cfg.train.seed + 1, ctx)
    modules: dict[str, torch.nn.Module] = {"model": student}
    parameters = list(student.parameters())
    if branch is not None:
        modules["global_branch"] = branch
        parameters += list(branch.parameters())
    if teacher is not None:
        modules["teacher"] = teacher
    view = view_config(params.augment)
    trainer = ctx.trainer("oxnet")
    student.train()

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        generator = step_generator(cfg.train.seed, step, stream=1)
        seen = random_view(batch["image"], view, generator, batch["boxes"], batch["labels"])
        images = seen.images
        out = student(intensity_jitter(images, params.student_intensity, generator))
        has_boxes = batch["has_boxes"].to(images.device)
        losses: dict[str, Tensor] = dict(student.loss(out, seen.targets, weights=has_boxes.to(images.dtype)))
        if branch is not None:
            losses |= global_losses(branch, out, batch["image_labels"], batch["has_image_labels"], params)
        chosen = ~has_boxes
        if teacher is not None and bool(chosen.any()):
            distilled, t_boxes = distillation_losses(student, out, teacher, images, chosen, params)
            losses |= distilled
            labels = torch.cat([d["labels"] for d in t_boxes]).cpu()
            trainer.log_counts("teacher_boxes", {name: int((labels == c).sum()) for c, name in enumerate(class_names)})
            trainer.log_metrics({"log_pseudo_boxes_per_image": len(labels) / max(len(t_boxes), 1)})
        return losses

    steps = cfg.train.max_steps if params.steps is None else params.steps
    stage_train = cfg.train if params.lr is None else cfg.train.model_copy(update={"lr": params.lr})
    trainer.fit(step_fn, modules, build_optimizer(parameters, stage_train), loader, steps, sampler=sampler,
                on_step_end=(lambda _: teacher.update(student)) if teacher is not None else None)
    return branch, teacher


# --------------------------------------------------------------------------------- evaluation


def map_confidence_interval(dataset: CXRDataset, predictions: Path, split: str, n_boot: int,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % CI of mAP (IoU 0.40:0.05:0.75) over ``n_boot`` image bootstrap replicates."""
    if n_boot == 0:
        return float("nan"), float("nan")
    rows = json.loads(predictions.read_text(encoding="utf-8"))
    match = match_detections(ground_truth_of(dataset, split), rows, CocoParams(iou_thresholds=OXNET_IOUS))
    replicates = np.array([accumulate(match, idx, main_only=True).ap()
                           for idx in bootstrap_indices(match.n_images, n_boot, seed)])
    replicates = replicates[~np.isnan(replicates)]
    if not replicates.size:
        return float("nan"), float("nan")
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(low), float(high)


def evaluate(ctx: RunContext, model: RetinaNet, dataset: CXRDataset, out_dir: Path, params: OXnetParams,
             title: str) -> dict[str, float]:
    """mAP over IoU 0.40:0.05:0.75 (with a bootstrap CI), mAP at each IoU, AP-S/M/L; writes ``out_dir``.

    Returns the flat headline (`kit.headline`: ``mAP``, ``mAP_ci_low``, ``mAP_ci_high``, ``mAP@0.4`` ...
    ``AP_large``, ``froc``, ``macro_AUROC``).
    """
    result: dict[str, float] = {}
    if ctx.fabric.is_global_zero:
        metrics = evaluate_detector(model, dataset, out_dir, split=params.eval_split, iou=OXNET_IOUS,
                                    n_boot=params.n_boot)
        low, high = map_confidence_interval(dataset, out_dir / "predictions.json", params.eval_split, params.n_boot)
        metrics["detection"]["ci95_mAP"] = [low, high]
        write_metrics(out_dir / "metrics.json", metrics)
        result = headline(metrics)
        print_metrics(ctx, result, title)
    ctx.fabric.barrier()
    return result


# --------------------------------------------------------------------------------- the recipe


@register_method("oxnet", OXnetParams)
def run(cfg: RunConfig, params: OXnetParams, ctx: RunContext) -> dict[str, float]:
    """Base RetinaNet on D_F, then (unless ``base_only``) OXnet's omni-supervised fine-tuning."""
    torch.manual_seed(cfg.train.seed)
    data = StudyData.from_config(cfg.data)
    train = data.dataset("train")
    held_out = data.dataset(params.eval_split)
    if len(held_out) == 0:
        raise ConfigError(f"method.params.eval_split: split {params.eval_split!r} has no images")
    counts = {kind: sum(im.supervision == kind for im in train.images) for kind in ("box", "image", "none")}
    ctx.console.print(f"OXnet training images: D_F {counts['box']}, D_W {counts['image']}, D_U {counts['none']}")
    if params.base_checkpoint is not None:
        student = build_detector(cfg.model, data.num_classes)
        load_module_weights(params.base_checkpoint, student)
    else:  # the shared supervised stage: the supervised_detector checkpoint at the same steps and view
        student = module_as(supervised_stage(ctx, data, steps=params.base_steps, augment=params.augment).model,
                            RetinaNet)
        student.train()

    out = {f"data/n_{k}": float(v) for k, v in counts.items()}  # training images per supervision
    if params.base_only or params.base_checkpoint is None:
        out |= prefixed(evaluate(ctx, student, held_out, ctx.run_dir.path / "eval_base", params, "base RetinaNet"), "base")
    if params.base_only:
        return out | _final(ctx, student, data.class_names, out, "base")
    _, teacher = omni_supervised(cfg, params, ctx, train, student, data.class_names)
    out |= prefixed(evaluate(ctx, student, held_out, ctx.run_dir.eval, params, "OXnet student"), "student")
    if teacher is not None:
        out |= prefixed(evaluate(ctx, module_as(teacher.module, RetinaNet), held_out, ctx.run_dir.path / "eval_teacher",
                                 params, "OXnet teacher (EMA)"), "teacher")
    return out | _final(ctx, student, data.class_names, out, "student")


def _final(ctx: RunContext, detector: RetinaNet, class_names: list[str], out: dict[str, float],
           name: str) -> dict[str, float]:
    """Export the final detector (the global head only shapes training) and its metrics, unprefixed.
    With ``base_only`` the base detector is final: its evaluation files are copied into ``eval/``,
    where `cxrdistill report` and the study table read a run's final model."""
    if ctx.fabric.is_global_zero:
        if name == "base":
            ctx.run_dir.eval.mkdir(parents=True, exist_ok=True)
            for file in (ctx.run_dir.path / "eval_base").glob("*.json"):
                shutil.copyfile(file, ctx.run_dir.eval / file.name)
        export_model(ctx.run_dir.path / "model.pt", detector, ctx.cfg.model, class_names, ctx.cfg.data.image_size)
    return stage_metrics(out, name)
