"""The offline-teacher pattern (teacher → stored detections → student) that TSD, CEIRD and STAC share.

1. The teacher is the shared supervised stage (:func:`cxrdistill.methods.kit.supervised_stage`).
2. Its detections on every unlabeled image are predicted once and kept in the pseudo-label store
   (:func:`stored_detections`).
3. :func:`select_pseudo_labels` turns them into per-class score thresholds
   (``pseudo.selection``: the paper's τ, ``precision@P`` on the validation split, or
   ``topk_per_class``), records them, and runs the collapse guard.
4. :func:`distill_detector` trains a fresh student on labeled boxes and the selected teacher boxes.

Random views of a step come from ``step_generator(seed, step)`` only, so a resumed stage sees the
same augmentation as an uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from cxrdistill.atomic import write_json_atomic
from cxrdistill.data.dataset import CXRDataset
from cxrdistill.data.study import StudyData
from cxrdistill.data.views import ViewConfig, project_boxes, random_view
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.loop import FitResult
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.errors import CheckpointError, ConfigError
from cxrdistill.eval.runs import evaluate_detections, predict_detections
from cxrdistill.methods.kit import (
    Augment,
    SemiBatch,
    Stage,
    TrainSets,
    evaluate_stage,
    headline,
    labeled_loader,
    semi_losses,
    split_train,
    step_generator,
)
from cxrdistill.models.detector import DetectorOutput, RetinaNet
from cxrdistill.pseudo.collapse import CollapseReport, check_collapse, guard
from cxrdistill.pseudo.generate import stored_pseudo_labels
from cxrdistill.pseudo.selection import (
    PseudoSelection,
    Selection,
    expected_counts,
    fixed_thresholds,
    kept_per_class,
    precision_thresholds,
    topk_thresholds,
)
from cxrdistill.pseudo.store import PseudoLabelStore
from cxrdistill.pseudo.thresholds import detections_to_targets, filter_detections, select_boxes

Detections = dict[str, Tensor]


# ------------------------------------------------------------------------------------ params


class OfflineParams(BaseModel):
    """`method.params` of the offline teacher-student recipes (TSD, CEIRD); defaults follow CEIRD's
    implementation paragraph."""

    model_config = ConfigDict(extra="forbid")

    teacher_steps: int | None = Field(None, ge=0)
    """Optimizer steps of the labeled-only teacher (None: ``train.max_steps``; paper: 2000 iterations)."""
    teacher_augment: Augment = "flip"
    """The teacher's view (the supervised stage's ``augment``; the baseline's ``method.params.augment``)."""
    student_steps: int | None = Field(None, ge=0)
    """Optimizer steps of each student (None: ``train.max_steps``; paper: 2000 iterations)."""
    labeled_ratio: int = Field(2, ge=1)
    unlabeled_ratio: int = Field(1, ge=0)
    """Labeled:unlabeled images per student batch, 2:1 in the paper; ``train.batch_size`` images in all."""
    pseudo_score_thresh: float = Field(0.5, gt=0.0, lt=1.0)
    """τ of ``pseudo.selection: fixed``: teacher boxes scoring at least this become pseudo-labels."""
    pseudo: PseudoSelection = Field(default_factory=PseudoSelection)
    """How pseudo-labels are selected and what a collapse does (`pseudo.selection`)."""
    store_score_thresh: float = Field(0.05, ge=0.0, lt=1.0)
    """Teacher detections above this are stored (pseudo-labels and APCLR read from them)."""
    unsup_weight: float = Field(1.0, ge=0.0)
    """Weight of the unlabeled term of Eq. (2) (1 in the paper)."""
    flip_p: float = Field(0.5, ge=0.0, le=1.0)
    translate: float = Field(0.1, ge=0.0, lt=0.5)
    """Random horizontal flip and shift (as a fraction of the size) of the students' views."""
    topk_candidates: int = Field(1000, ge=1)
    """(anchor, class) candidates kept before NMS when decoding (RetinaNet: 1000; lower is faster on CPU)."""
    eval_split: str = "test"
    n_boot: int = Field(1000, ge=0)
    predict_batch_size: int = Field(32, ge=1)

    def schedule(self) -> StudentSchedule:
        return StudentSchedule(self.labeled_ratio, self.unlabeled_ratio, self.student_steps, self.flip_p,
                               self.translate, self.unsup_weight, self.topk_candidates)


# ------------------------------------------------------------------------------------ data


def truth_of(dataset: CXRDataset, indices: Sequence[int] | None = None) -> list[Detections]:
    """The manifest's boxes (cache pixels) and labels of ``dataset``'s images (or ``indices``)."""
    out = []
    for i in range(len(dataset.images)) if indices is None else indices:
        rec = dataset.images[i]
        boxes, labels = dataset.manifest.boxes_xyxy(rec.id)
        sx, sy = dataset.scale_of(rec)
        out.append({"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
                    * torch.tensor([sx, sy, sx, sy], dtype=torch.float32),
                    "labels": torch.as_tensor(labels, dtype=torch.long).reshape(-1)})
    return out


# ------------------------------------------------------------------------------------ views


def output_rows(out: DetectorOutput, rows: Tensor) -> DetectorOutput:
    """The head outputs of the images ``rows`` (bool mask or indices) of a batch."""
    return replace(out, cls_logits=out.cls_logits[rows], box_deltas=out.box_deltas[rows],
                   fpn_features=[f[rows] for f in out.fpn_features], backbone_feature=out.backbone_feature[rows])


def project_detections(dets: Detections, matrix: Tensor, image_size: tuple[int, int]) -> Detections:
    """Boxes of one image moved into a view (boxes mostly outside it are dropped with their entries)."""
    boxes, keep = project_boxes(dets["boxes"], matrix, image_size)
    out = select_boxes(dets, keep)
    out["boxes"] = boxes
    return out


# ------------------------------------------------------------------------------------ pseudo-labels


@torch.no_grad()
def stored_detections(ctx: RunContext, model: RetinaNet, sets: TrainSets, generation: int, *, fresh: bool,
                      store_score_thresh: float = 0.05, topk_candidates: int = 1000, batch_size: int = 32,
                      root: str = "pseudo/vision") -> dict[int, Detections]:
    """Detections of generation ``generation``'s model on the unlabeled images, from the store.

    Predicted once: a complete generation is read back; a killed pass resumes where it stopped.
    ``fresh``: the model changed in this run, so anything stored for this generation is stale.
    """
    def predict(batch: dict[str, Any]) -> list[Detections]:
        return model.predict(batch["image"].to(ctx.device), score_thresh=store_score_thresh,
                             topk_candidates=topk_candidates)

    store = PseudoLabelStore(ctx.run_dir.path / root, generation)
    meta = {"score_thresh": store_score_thresh, "topk_candidates": topk_candidates}
    records = stored_pseudo_labels(predict, sets.dataset, store, fresh=fresh, fabric=ctx.fabric, metadata=meta,
                                   indices=sets.unlabeled, batch_size=batch_size, chunk_size=4 * batch_size)
    return {int(k): v for k, v in records.items()}  # type: ignore[misc]


def class_counts(dets: Sequence[Detections], class_names: Sequence[str]) -> dict[str, int]:
    """Boxes per class over a list of per-image detections."""
    counts = torch.zeros(len(class_names), dtype=torch.long)
    for d in dets:
        counts += torch.bincount(d["labels"].long().cpu(), minlength=len(class_names))[: len(class_names)]
    return dict(zip(class_names, counts.tolist()))


def select_pseudo_labels(ctx: RunContext, teacher: RetinaNet, sets: TrainSets, data: StudyData,
                         dets: dict[int, Detections], tau: float, pseudo: PseudoSelection, *,
                         topk_candidates: int = 1000, batch_size: int = 32, name: str = "teacher",
                         out_name: str = "pseudo_selection.json") -> tuple[Selection, CollapseReport]:
    """Per-class thresholds for ``dets`` (the teacher's stored unlabeled detections), recorded in
    ``run_dir/<out_name>`` with the boxes kept per class, then the collapse guard (warn / stop)."""
    names = data.class_names
    labeled_truth = truth_of(sets.dataset, sets.labeled)
    ids = sets.unlabeled_ids
    unlabeled = [dets[i] for i in ids]
    kappa = expected_counts(labeled_truth, len(ids), len(names))
    if pseudo.selection == "fixed":
        selection = fixed_thresholds(tau, names)
    elif pseudo.selection == "topk_per_class":
        selection = topk_thresholds(unlabeled, kappa, names)
    else:
        val = data.dataset(pseudo.val_split)
        if not len(val):
            raise ConfigError(f"pseudo.selection={pseudo.selection}: split {pseudo.val_split!r} has no images "
                              "(set method.params.pseudo.val_split)")
        val_dets = predict_detections(teacher, val, batch_size=batch_size, topk_candidates=topk_candidates)
        selection = precision_thresholds([val_dets[im.id] for im in val.images], truth_of(val),
                                         float(pseudo.precision), names, iou=pseudo.iou,  # type: ignore[arg-type]
                                         min_val_boxes=pseudo.min_val_boxes,
                                         fallback=topk_thresholds(unlabeled, kappa, names))
    kept = kept_per_class(unlabeled, selection.thresholds, names)
    for n in names:
        selection.records[n]["kept_unlabeled"] = kept[n]
    labeled_classes = [n for n, c in class_counts(labeled_truth, names).items() if c > 0]
    report = check_collapse(unlabeled, selection.thresholds, names, labeled_classes,
                            min_image_fraction=pseudo.min_image_fraction)
    if ctx.fabric.is_global_zero:
        write_json_atomic(ctx.run_dir.path / out_name, {"model": name, **selection.to_dict(),
                                                        "kept_per_class": kept, "collapse": report.to_dict()})
    guard(report, pseudo.on_collapse, ctx.console, where=f"{name} ({pseudo.selection})")
    return selection, report


class PseudoRefiner(Protocol):
    """Turns a batch's teacher pseudo-labels into the student's targets.

    ``__call__(teacher, student, image_ids) -> (refined, counts)``: ``teacher`` and ``student``
    (None unless ``needs_student``) are per-image detections in the student's view; ``counts`` maps
    a refinement step ("teacher", "sa_nms", ...) to boxes per class after it.
    """

    @property
    def needs_student(self) -> bool: ...

    def __call__(self, teacher: list[Detections], student: list[Detections] | None,
                 image_ids: list[int]) -> tuple[list[Detections], dict[str, dict[str, int]]]: ...


@dataclass
class PlainPseudoLabels:
    """TSD: the teacher's pseudo-labels, unchanged."""

    class_names: list[str]
    needs_student: bool = False

    def __call__(self, teacher: list[Detections], student: list[Detections] | None,
                 image_ids: list[int]) -> tuple[list[Detections], dict[str, dict[str, int]]]:
        return teacher, {"teacher": class_counts(teacher, self.class_names)}


class CountTotals:
    """Pseudo-label counts summed over a stage's steps; checkpointed with the stage (``extra_state``)."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, int]] = {}

    def add(self, counts: dict[str, dict[str, int]]) -> None:
        for step_name, per_class in counts.items():
            into = self.totals.setdefault(step_name, {})
            for name, n in per_class.items():
                into[name] = into.get(name, 0) + int(n)

    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(self.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = json.loads(state["json"])


# ------------------------------------------------------------------------------------ the student


def batch_split(batch_size: int, labeled_ratio: int, unlabeled_ratio: int) -> tuple[int, int]:
    """Labeled and unlabeled images per batch of ``batch_size`` at the ratio (at least one of each)."""
    if unlabeled_ratio == 0:
        return batch_size, 0
    n_unlabeled = max(1, round(batch_size * unlabeled_ratio / (labeled_ratio + unlabeled_ratio)))
    return max(1, batch_size - n_unlabeled), n_unlabeled


@dataclass
class StudentSchedule:
    """How a student of Eq. (2) trains: batch ratio, steps, view, unlabeled weight, decoding."""

    labeled_ratio: int = 2
    unlabeled_ratio: int = 1
    steps: int | None = None
    flip_p: float = 0.5
    translate: float = 0.1
    unsup_weight: float = 1.0
    topk_candidates: int = 1000

    def view(self) -> ViewConfig:
        """The students' view: random horizontal flip and shift."""
        return ViewConfig(flip_p=self.flip_p, translate=self.translate)


def distill_detector(ctx: RunContext, stage: str, student: RetinaNet, sets: TrainSets,
                     pseudo: dict[int, Detections], thresholds: Tensor, schedule: StudentSchedule,
                     refiner: PseudoRefiner, seed: int) -> tuple[FitResult, CountTotals]:
    """Train ``student`` by Eq. (2): real boxes on labeled images, refined teacher boxes on unlabeled.

    ``pseudo``: the frozen teacher's stored detections per unlabeled image id. Per batch they are
    thresholded (``thresholds (C,)``, one per class), moved into the student's view, handed to
    ``refiner`` (with the student's current detections of the same view when the refiner asks for
    them), and the refined boxes are the unlabeled targets. The view of step ``t`` comes from
    ``step_generator(seed, t)`` (resume-exact). Counts per class are logged every step and summed.
    """
    cfg = ctx.cfg.train
    n_labeled, n_unlabeled = batch_split(cfg.batch_size, schedule.labeled_ratio, schedule.unlabeled_ratio)
    loader, sampler = labeled_loader(sets.dataset, sets.labeled, sets.unlabeled, n_labeled, n_unlabeled, seed, ctx)
    trainer = ctx.trainer(stage)
    totals = CountTotals()

    def step(batch: dict[str, Any], t: int) -> dict[str, Tensor]:
        # one view of the whole batch (the rows share the student's forward pass); parts by mask
        view = random_view(batch["image"], schedule.view(), step_generator(seed, t), batch["boxes"], batch["labels"])
        size = (int(view.images.shape[-2]), int(view.images.shape[-1]))
        semi = SemiBatch.split(batch)
        out = student(view.images)
        sup = unsup = None
        if len(semi.labeled):
            targets = view.targets
            sup = student.loss(output_rows(out, semi.labeled.rows.to(view.images.device)),
                               [targets[i] for i in semi.labeled.index])
        if len(semi.unlabeled):
            rows, unlabeled = semi.unlabeled.index, semi.unlabeled.rows.to(view.images.device)
            teacher = filter_detections([_on(pseudo, i, view.images.device) for i in semi.unlabeled.image_ids],
                                        thresholds)
            teacher = [project_detections(d, view.matrices[i], size) for d, i in zip(teacher, rows)]
            current = None
            if refiner.needs_student:
                current = student.decode(output_rows(out, unlabeled), score_thresh=0.05,
                                         topk_candidates=schedule.topk_candidates)
            refined, counts = refiner(teacher, current, semi.unlabeled.image_ids)
            for name, per_class in counts.items():
                trainer.log_counts(f"pseudo/{name}", per_class)
            totals.add(counts)
            unsup = student.loss(output_rows(out, unlabeled), detections_to_targets(refined, soft=False))
        losses = semi_losses(sup or {}, unsup, schedule.unsup_weight)
        if unsup is not None:
            losses["log_pseudo_boxes_per_image"] = torch.tensor(sum(len(r["labels"]) for r in refined) / len(rows))
        return losses

    steps = cfg.max_steps if schedule.steps is None else schedule.steps
    result = trainer.fit(step, {"model": student}, build_optimizer(student.parameters(), cfg), loader, steps,
                         sampler=sampler, extra_state={"pseudo_counts": totals})
    return result, totals


def _on(pseudo: dict[int, Detections], image_id: int, device: torch.device) -> Detections:
    if image_id not in pseudo:
        raise CheckpointError(f"image {image_id}: no stored teacher detections (the pseudo-label store is incomplete)")
    return {k: v.to(device) for k, v in pseudo[image_id].items()}


# ------------------------------------------------------------------------------------ evaluation


def evaluate_vision(model: RetinaNet, eval_set: CXRDataset, out_dirs: Sequence[Path], *, split: str, n_boot: int,
                    topk_candidates: int = 1000, batch_size: int = 32) -> dict[str, Any]:
    """mAP@0.25/0.5/0.75 (and the rest of `evaluate_detections`) of ``model`` on ``eval_set``;
    the report files are written into each of ``out_dirs``."""
    dets = predict_detections(model, eval_set, batch_size=batch_size, topk_candidates=topk_candidates)
    metrics: dict[str, Any] = {}
    for out_dir in out_dirs:
        metrics = evaluate_detections(dets, eval_set, out_dir, split=split, n_boot=n_boot)
    return metrics


def evaluate_teacher(ctx: RunContext, stage: Stage, eval_set: CXRDataset, params: OfflineParams,
                     out_dirs: list[Path]) -> dict[str, float]:
    """The own teacher's headline (`kit.headline`) on the test images (from the stage store when already scored)."""
    return headline(evaluate_stage(ctx, stage, eval_set, split=params.eval_split, n_boot=params.n_boot,
                                             topk_candidates=params.topk_candidates, out_dirs=out_dirs,
                                             batch_size=params.predict_batch_size))


def describe_delta(title: str, out: dict[str, float], metric: str = "mAP@0.5") -> str:
    """One console line: the student, its own teacher and the paired Δ with its CI."""
    s, t = out.get(f"student/{metric}", out.get(metric)), out.get(f"teacher/{metric}")
    d = out.get(f"delta_teacher/{metric}")
    lo, hi = out.get(f"delta_teacher/{metric}_ci_low"), out.get(f"delta_teacher/{metric}_ci_high")
    return f"{title}: {metric} student {s:.4f}, own teacher {t:.4f}, Δ {d:+.4f} [{lo:+.4f}, {hi:+.4f}]"


__all__ = [
    "CountTotals", "Detections", "OfflineParams", "describe_delta", "evaluate_teacher", "PlainPseudoLabels", "PseudoRefiner", "StudentSchedule", "TrainSets", "batch_split",
    "class_counts", "distill_detector", "evaluate_vision", "output_rows", "project_detections",
    "select_pseudo_labels", "split_train", "stored_detections", "truth_of",
]
