"""STAC (Sohn et al., "A Simple Semi-Supervised Learning Framework for Object Detection", 2020),
on the same RetinaNet as every other detection recipe.

1. The teacher is the shared supervised stage on D_B (`kit.supervised_stage`: the
   `supervised_detector` baseline's checkpoint at the same seed)                  stage ``supervised``
2. Predict the unlabeled training images once (no augmentation) and store the detections in the
   pseudo-label store (``pseudo/generation_000``; never recomputed on a rerun)
3. Keep the boxes with confidence ≥ τ (τ = 0.9, the paper's value), or per-class thresholds of
   ``pseudo.selection`` (``precision@P``, ``topk_per_class``); the collapse guard checks them
4. Train a fresh student on D_B (weak view) and on the unlabeled images under **strong
   augmentation** (geometry + intensity, the kept boxes carried along with
   `data.views.project_boxes`): L = L_s + λ_u · L_u, λ_u = 2 (paper)         stage ``student``

An unlabeled image whose boxes all fall below τ still trains the student: as background.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from cxrdistill.config import RunConfig
from cxrdistill.data.study import StudyData
from cxrdistill.data.views import ViewConfig
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.eval.runs import evaluate_detections, predict_detections
from cxrdistill.methods.kit import (
    Augment,
    SemiBatch,
    build_detector,
    evaluate_final,
    evaluate_stage,
    headline,
    module_as,
    semi_loader,
    semi_losses,
    split_train,
    step_generator,
    supervised_stage,
    teacher_comparison,
    view_config,
    write_teacher_comparison,
)
from cxrdistill.methods.offline import select_pseudo_labels, stored_detections
from cxrdistill.methods.registry import register_method
from cxrdistill.models.detector import RetinaNet
from cxrdistill.pseudo.selection import PseudoSelection
from cxrdistill.pseudo.thresholds import detections_to_targets, filter_detections


class StacParams(BaseModel):
    """`method.params` of ``stac``; defaults are the paper's values."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.9, ge=0.0, le=1.0)
    """τ: a teacher box becomes a pseudo-label when its score is at least this (paper: 0.9)."""
    pseudo: PseudoSelection = Field(default_factory=PseudoSelection)
    """How pseudo-labels are selected (``fixed``: τ) and what a collapse does."""
    topk_candidates: int = Field(1000, ge=1)
    """Decoding candidates of the teacher's and the student's evaluation (RetinaNet: 1000)."""
    unsup_weight: float = Field(2.0, ge=0.0)
    """λ_u of L = L_s + λ_u L_u (paper: 2)."""
    strong_augment: bool = True
    """Strong augmentation of the unlabeled images (False: the labeled images' weak view; ablation)."""
    augment: Augment = "flip"
    """Augmentation of the labeled images (teacher and student)."""
    teacher_steps: int | None = Field(None, ge=1)
    """Optimizer steps of the teacher (None: `train.max_steps`)."""
    unlabeled_supervision: list[str] = Field(default_factory=lambda: ["image", "none"])
    """Training images (other than D_B) that receive pseudo-labels."""
    train_split: str = "train"
    eval_split: str = "test"
    n_boot: int = Field(1000, ge=0)


def pseudo_targets(records: dict[Any, dict[str, Tensor]], image_ids: list[int],
                   threshold: float | Tensor) -> list[dict[str, Tensor]]:
    """Hard detector targets of ``image_ids`` from stored teacher detections: the boxes scoring ≥ τ
    (one τ, or a ``(C,)`` tensor of per-class thresholds)."""
    dets = [records[i] for i in image_ids]
    return detections_to_targets(filter_detections(dets, threshold), soft=False)


@register_method("stac", StacParams)
def run(cfg: RunConfig, params: StacParams, ctx: RunContext) -> dict[str, float]:
    """Teacher on D_B → stored pseudo-boxes (τ) → student on D_B + strongly augmented unlabeled images."""
    data = StudyData.from_config(cfg.data)
    sets = split_train(data, params.train_split, params.unlabeled_supervision, need_unlabeled="stac")
    t = cfg.train

    # 1. teacher: the shared supervised stage, scored on the test images
    stage = supervised_stage(ctx, data, steps=params.teacher_steps, augment=params.augment, split=params.train_split)
    teacher = module_as(stage.model, RetinaNet)
    held_out = data.dataset(params.eval_split)
    teacher_dir = ctx.run_dir.path / "eval_teacher"
    teacher_metrics = headline(evaluate_stage(ctx, stage, held_out, split=params.eval_split, n_boot=params.n_boot,
                                              topk_candidates=params.topk_candidates, out_dirs=[teacher_dir]), "teacher")
    # 2. offline pseudo-labels, 3. their selection (τ or pseudo.selection) and the collapse guard
    records = stored_detections(ctx, teacher, sets, 0, fresh=stage.fresh, root="pseudo")
    selection, collapse = select_pseudo_labels(ctx, teacher, sets, data, records, params.threshold, params.pseudo)
    # 4. student
    student = build_detector(cfg.model, data.num_classes, t.seed + 1)
    loader, sampler = semi_loader(ctx, sets, t.seed)
    weak = view_config(params.augment)
    strong = ViewConfig.martins_silva() if params.strong_augment else weak
    trainer = ctx.trainer("student")
    student.train()

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        semi = SemiBatch.split(batch)
        labeled, unlabeled = semi.labeled, semi.unlabeled
        labeled.weak = labeled.view(weak, step_generator(t.seed, step))
        sup = student.loss(student(labeled.weak.images), labeled.weak.targets)
        pseudo = pseudo_targets(records, unlabeled.image_ids, selection.thresholds)
        device = labeled.weak.images.device
        unlabeled.strong = unlabeled.view(strong, step_generator(t.seed, step, stream=1),
                                          [p["boxes"].to(device) for p in pseudo], [p["labels"].to(device) for p in pseudo])
        unsup = student.loss(student(unlabeled.strong.images), unlabeled.strong.targets)
        trainer.log_counts("pseudo_boxes", {data.class_names[c]: int(sum((p["labels"] == c).sum() for p in pseudo))
                                            for c in range(data.num_classes)})
        trainer.log_metrics({"log_pseudo_boxes_per_image": sum(len(p["labels"]) for p in pseudo) / max(len(pseudo), 1)})
        return semi_losses(sup, unsup, params.unsup_weight)

    trainer.fit(step_fn, {"student": student}, build_optimizer(student.parameters(), t), loader, t.max_steps,
                sampler=sampler)
    metrics = evaluate_final(ctx, lambda: evaluate_detections(
        predict_detections(student, held_out, topk_candidates=params.topk_candidates), held_out, ctx.run_dir.eval,
        split=params.eval_split, n_boot=params.n_boot), "STAC student", student, data.class_names)
    comparison = teacher_comparison(held_out, params.eval_split, teacher_dir, ctx.run_dir.eval, n_boot=params.n_boot)
    write_teacher_comparison(ctx, comparison, stage)
    return {**metrics, **teacher_metrics, **comparison, "pseudo/collapsed": float(collapse.collapsed)}


__all__ = ["StacParams", "pseudo_targets", "run"]
