"""Offline teacher-student detection (TSD), the baseline of CEIRD (Sun et al., MICCAI 2023, Eq. 2).

1. A teacher RetinaNet is trained on the labeled images (focal + smooth-L1 loss) and frozen.
2. Its detections on every unlabeled image are computed once and kept in the pseudo-label store
   (``run_dir/pseudo/vision/generation_000``); a rerun reads them back instead of predicting again.
3. A student, freshly initialised, learns from labeled images (real boxes) and unlabeled images
   (the teacher's boxes scoring >= ``pseudo_score_thresh``), labeled:unlabeled 2:1 per batch:
   ``L = Σ_l [L_cls + L_reg] + Σ_u [L_cls(ŷ, y_pv) + L_reg(B̂, B_pv)]``.

Both models see randomly flipped and shifted views (the paper's "random cropping and flipping");
box targets are projected into the view with the view's geometry. The per-batch pseudo-labels pass
through a :class:`PseudoRefiner`; plain TSD keeps them as they are, CEIRD plugs SA-NMS and RPDLR in
there (see :mod:`cxrdistill.methods.ceird`). The building blocks here are shared by both recipes.
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
from torch.utils.data import DataLoader

from cxrdistill.config import ModelConfig, RunConfig
from cxrdistill.data.dataset import CXRDataset, collate
from cxrdistill.data.study import StudyData
from cxrdistill.data.views import project_boxes, random_affine, warp_images
from cxrdistill.engine.checkpoint import load_module_weights
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.loop import FitResult
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.engine.sampler import RatioBatchSampler
from cxrdistill.errors import CheckpointError, ConfigError
from cxrdistill.eval.runs import evaluate_detections, predict_detections
from cxrdistill.methods.registry import register_method
from cxrdistill.models.factory import build_model, export_model
from cxrdistill.models.detector import DetectorOutput, RetinaNet
from cxrdistill.pseudo.generate import stored_pseudo_labels
from cxrdistill.pseudo.store import PseudoLabelStore
from cxrdistill.pseudo.thresholds import detections_to_targets, filter_detections, select_boxes

Detections = dict[str, Tensor]


class TsdParams(BaseModel):
    """Vision teacher-student distillation; defaults follow CEIRD's implementation paragraph."""

    model_config = ConfigDict(extra="forbid")

    teacher_steps: int | None = Field(None, ge=0)
    """Optimizer steps of the labeled-only teacher (None: ``train.max_steps``; paper: 2000 iterations)."""
    student_steps: int | None = Field(None, ge=0)
    """Optimizer steps of each student (None: ``train.max_steps``; paper: 2000 iterations)."""
    labeled_ratio: int = Field(2, ge=1)
    unlabeled_ratio: int = Field(1, ge=0)
    """Labeled:unlabeled images per student batch, 2:1 in the paper; ``train.batch_size`` images in all."""
    pseudo_score_thresh: float = Field(0.5, gt=0.0, lt=1.0)
    """Teacher boxes scoring at least this become pseudo-labels (the paper does not state a value)."""
    store_score_thresh: float = Field(0.05, ge=0.0, lt=1.0)
    """Teacher detections above this are stored (pseudo-labels and APCLR read from them)."""
    unsup_weight: float = Field(1.0, ge=0.0)
    """Weight of the unlabeled term of Eq. (2) (1 in the paper)."""
    flip_p: float = Field(0.5, ge=0.0, le=1.0)
    translate: float = Field(0.1, ge=0.0, lt=0.5)
    """Random horizontal flip and shift (as a fraction of the size) of the training views."""
    topk_candidates: int = Field(1000, ge=1)
    """(anchor, class) candidates kept before NMS when decoding (RetinaNet: 1000; lower is faster on CPU)."""
    teacher_checkpoint: Path | None = None
    """Start from this checkpoint's ``model`` weights (another run's ``checkpoints/vision_gen0/last.pt``)
    instead of training the generation-0 teacher, so ablation runs share one teacher."""
    eval_split: str = "test"
    n_boot: int = Field(1000, ge=0)
    predict_batch_size: int = Field(32, ge=1)


# ------------------------------------------------------------------------------------ data


@dataclass
class TrainSets:
    """The training images: one dataset and the indices of its labeled / unlabeled images."""

    dataset: CXRDataset
    labeled: list[int]
    unlabeled: list[int]

    @property
    def unlabeled_ids(self) -> list[int]:
        return [self.dataset.images[i].id for i in self.unlabeled]


def split_train(data: StudyData, split: str = "train") -> TrainSets:
    """Labeled (supervision "box") and unlabeled ("none"; "image" images count as unlabeled too,
    their image-level labels are not used) training images."""
    dataset = data.dataset(split, supervision=("box", "image", "none"))
    labeled = [i for i, im in enumerate(dataset.images) if im.supervision == "box"]
    unlabeled = [i for i, im in enumerate(dataset.images) if im.supervision != "box"]
    if not labeled:
        raise ConfigError(f"split {split!r} has no image with boxes: the teacher needs labeled images "
                          "(set data.boxed_fraction, or use a manifest with supervision 'box')")
    return TrainSets(dataset, labeled, unlabeled)


# ------------------------------------------------------------------------------------ models


def build_detector(model_cfg: ModelConfig, num_classes: int, seed: int) -> RetinaNet:
    """A freshly initialised RetinaNet of ``cfg.model`` whose weights depend only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(model_cfg, num_classes, expect="detector")  # type: ignore[return-value]


def output_rows(out: DetectorOutput, rows: Tensor) -> DetectorOutput:
    """The head outputs of the images ``rows`` (bool mask or indices) of a batch."""
    return replace(out, cls_logits=out.cls_logits[rows], box_deltas=out.box_deltas[rows],
                   fpn_features=[f[rows] for f in out.fpn_features], backbone_feature=out.backbone_feature[rows])


# ------------------------------------------------------------------------------------ views


def random_view(images: Tensor, params: TsdParams, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A randomly flipped and shifted view of ``images (B, 1, H, W)`` and its matrices ``(B, 3, 3)``."""
    matrices = random_affine(images.shape[0], image_size=tuple(images.shape[-2:]), flip_p=params.flip_p,
                             translate=params.translate, generator=generator).to(images.device)
    return warp_images(images, matrices), matrices


def project_detections(dets: Detections, matrix: Tensor, image_size: tuple[int, int]) -> Detections:
    """Boxes of one image moved into a view (boxes mostly outside it are dropped with their entries)."""
    boxes, keep = project_boxes(dets["boxes"], matrix, image_size)
    out = select_boxes(dets, keep)
    out["boxes"] = boxes
    return out


# ------------------------------------------------------------------------------------ pseudo-labels


@torch.no_grad()
def stored_detections(ctx: RunContext, model: RetinaNet, sets: TrainSets, generation: int, params: TsdParams,
                      fresh: bool) -> dict[int, Detections]:
    """Detections of generation ``generation``'s vision model on the unlabeled images, from the store.

    Predicted once: a complete generation is read back; a killed pass resumes where it stopped.
    ``fresh``: the model was (re)trained in this run, so anything stored for this generation is stale.
    """
    def predict(batch: dict[str, Any]) -> list[Detections]:
        return model.predict(batch["image"].to(ctx.device), score_thresh=params.store_score_thresh,
                             topk_candidates=params.topk_candidates)

    store = PseudoLabelStore(ctx.run_dir.path / "pseudo" / "vision", generation)
    meta = {"score_thresh": params.store_score_thresh, "topk_candidates": params.topk_candidates}
    records = stored_pseudo_labels(predict, sets.dataset, store, fresh=fresh, fabric=ctx.fabric, metadata=meta,
                                   indices=sets.unlabeled, batch_size=params.predict_batch_size,
                                   chunk_size=4 * params.predict_batch_size)
    return {int(k): v for k, v in records.items()}  # type: ignore[misc]


def class_counts(dets: Sequence[Detections], class_names: Sequence[str]) -> dict[str, int]:
    """Boxes per class over a list of per-image detections."""
    counts = torch.zeros(len(class_names), dtype=torch.long)
    for d in dets:
        counts += torch.bincount(d["labels"].long().cpu(), minlength=len(class_names))[: len(class_names)]
    return dict(zip(class_names, counts.tolist()))


class PseudoRefiner(Protocol):
    """Turns a batch's teacher pseudo-labels into the student's targets.

    ``__call__(teacher, student, image_ids) -> (refined, counts)``: ``teacher`` and ``student``
    (None unless ``needs_student``) are per-image detections in the student's view; ``counts`` maps
    a refinement step ("teacher", "sa_nms", ...) to boxes per class after it.
    """

    needs_student: bool

    def __call__(self, teacher: list[Detections], student: list[Detections] | None,
                 image_ids: list[int]) -> tuple[list[Detections], dict[str, dict[str, int]]]: ...


@dataclass
class PlainPseudoLabels:
    """TSD: the teacher's pseudo-labels, unchanged."""

    class_names: list[str]
    needs_student: bool = False

    def __call__(self, teacher, student, image_ids):
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


# ------------------------------------------------------------------------------------ training


def _loader(ctx: RunContext, sets: TrainSets, n_labeled: int, n_unlabeled: int, seed: int):
    sampler = RatioBatchSampler(sets.labeled, sets.unlabeled, n_labeled, n_unlabeled, seed,
                                rank=ctx.rank, world_size=ctx.world_size)
    loader = DataLoader(sets.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=ctx.cfg.data.num_workers)
    return loader, sampler


def batch_split(batch_size: int, labeled_ratio: int, unlabeled_ratio: int) -> tuple[int, int]:
    """Labeled and unlabeled images per batch of ``batch_size`` at the ratio (at least one of each)."""
    if unlabeled_ratio == 0:
        return batch_size, 0
    n_unlabeled = max(1, round(batch_size * unlabeled_ratio / (labeled_ratio + unlabeled_ratio)))
    return max(1, batch_size - n_unlabeled), n_unlabeled


def train_teacher(ctx: RunContext, stage: str, model: RetinaNet, sets: TrainSets, params: TsdParams) -> FitResult:
    """Train ``model`` on the labeled images only (focal + smooth-L1); the generation-0 teacher."""
    cfg = ctx.cfg.train
    loader, sampler = _loader(ctx, sets, cfg.batch_size, 0, cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)

    def step(batch: dict[str, Any], _: int) -> dict[str, Tensor]:
        view, matrices = random_view(batch["image"], params, generator)
        size = tuple(view.shape[-2:])
        targets = [project_detections({"boxes": b, "labels": l}, m, size)
                   for b, l, m in zip(batch["boxes"], batch["labels"], matrices)]
        losses = model.loss(model(view), targets)
        return {"sup_cls": losses["cls"], "sup_box": losses["box"]}

    steps = cfg.max_steps if params.teacher_steps is None else params.teacher_steps
    return ctx.trainer(stage).fit(step, {"model": model}, build_optimizer(model.parameters(), cfg), loader, steps,
                                  sampler=sampler)


def distill_detector(ctx: RunContext, stage: str, student: RetinaNet, sets: TrainSets,
                     pseudo: dict[int, Detections], params: TsdParams, refiner: PseudoRefiner,
                     seed: int) -> tuple[FitResult, CountTotals]:
    """Train ``student`` by Eq. (2): real boxes on labeled images, refined teacher boxes on unlabeled.

    ``pseudo``: the frozen teacher's stored detections per unlabeled image id. Per batch they are
    thresholded (``pseudo_score_thresh``), moved into the student's view, handed to ``refiner``
    (with the student's current detections of the same view when the refiner asks for them), and
    the refined boxes are the unlabeled targets. Counts per class are logged every step and summed.
    """
    cfg = ctx.cfg.train
    n_labeled, n_unlabeled = batch_split(cfg.batch_size, params.labeled_ratio, params.unlabeled_ratio)
    loader, sampler = _loader(ctx, sets, n_labeled, n_unlabeled, seed)
    generator = torch.Generator().manual_seed(seed)
    trainer = ctx.trainer(stage)
    totals = CountTotals()

    def step(batch: dict[str, Any], _: int) -> dict[str, Tensor]:
        view, matrices = random_view(batch["image"], params, generator)
        size = tuple(view.shape[-2:])
        labeled = batch["has_boxes"].to(view.device)
        ids = batch["image_id"].tolist()
        out = student(view)
        losses: dict[str, Tensor] = {}
        if labeled.any():
            gt = [project_detections({"boxes": batch["boxes"][i], "labels": batch["labels"][i]}, matrices[i], size)
                  for i in range(len(ids)) if labeled[i]]
            sup = student.loss(output_rows(out, labeled), gt)
            losses.update(sup_cls=sup["cls"], sup_box=sup["box"])
        rows = [i for i in range(len(ids)) if not labeled[i]]
        if rows:
            unlabeled = ~labeled
            teacher = filter_detections([_on(pseudo, ids[i], view.device) for i in rows], params.pseudo_score_thresh)
            teacher = [project_detections(t, matrices[i], size) for t, i in zip(teacher, rows)]
            current = None
            if refiner.needs_student:
                current = student.decode(output_rows(out, unlabeled), score_thresh=0.05,
                                         topk_candidates=params.topk_candidates)
            refined, counts = refiner(teacher, current, [ids[i] for i in rows])
            for name, per_class in counts.items():
                trainer.log_counts(f"pseudo/{name}", per_class)
            totals.add(counts)
            unsup = student.loss(output_rows(out, unlabeled), detections_to_targets(refined, soft=False))
            losses.update(unsup_cls=params.unsup_weight * unsup["cls"], unsup_box=params.unsup_weight * unsup["box"])
            losses["log_pseudo_boxes_per_image"] = torch.tensor(sum(len(r["labels"]) for r in refined) / len(rows))
        return losses

    steps = cfg.max_steps if params.student_steps is None else params.student_steps
    result = trainer.fit(step, {"model": student}, build_optimizer(student.parameters(), cfg), loader, steps,
                         sampler=sampler, extra_state={"pseudo_counts": totals})
    return result, totals


def _on(pseudo: dict[int, Detections], image_id: int, device: torch.device) -> Detections:
    if image_id not in pseudo:
        raise CheckpointError(f"image {image_id}: no stored teacher detections (the pseudo-label store is incomplete)")
    return {k: v.to(device) for k, v in pseudo[image_id].items()}


# ------------------------------------------------------------------------------------ evaluation


DETECTION_KEYS = ("mAP@0.25", "mAP@0.5", "mAP@0.75")


def evaluate_vision(ctx: RunContext, model: RetinaNet, eval_set: CXRDataset, params: TsdParams,
                    out_dirs: Sequence[Path]) -> dict[str, Any]:
    """mAP@0.25/0.5/0.75 (and the rest of `evaluate_detections`) of ``model`` on ``eval_set``;
    the report files are written into each of ``out_dirs``."""
    dets = predict_detections(model, eval_set, batch_size=params.predict_batch_size,
                              topk_candidates=params.topk_candidates)
    metrics: dict[str, Any] = {}
    for out_dir in out_dirs:
        metrics = evaluate_detections(dets, eval_set, out_dir, split=params.eval_split, n_boot=params.n_boot)
    return metrics


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The CEIRD table's numbers (mAP at IoU 0.25 / 0.5 / 0.75) of an `evaluate_detections` result."""
    det = metrics["detection"]
    return {k: float("nan") if det.get(k) is None else float(det[k]) for k in DETECTION_KEYS}


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float) + "\n", encoding="utf-8")
    tmp.replace(path)


def vision_generation0(ctx: RunContext, cfg: RunConfig, params: TsdParams, sets: TrainSets,
                       num_classes: int) -> tuple[RetinaNet, bool]:
    """The generation-0 teacher, trained on labeled images (or loaded from ``teacher_checkpoint``).
    Returns it and whether it was trained in this run (then its stored predictions are stale)."""
    teacher = build_detector(cfg.model, num_classes, cfg.train.seed)
    if params.teacher_checkpoint is not None:
        load_module_weights(params.teacher_checkpoint, teacher)
        teacher.to(ctx.device)
        marker = ctx.run_dir.stage_dir("vision_gen0") / "teacher_source.json"
        fresh = not marker.is_file() or json.loads(marker.read_text())["path"] != str(params.teacher_checkpoint)
        write_json(marker, {"path": str(params.teacher_checkpoint)})
        return teacher, fresh
    return teacher, not train_teacher(ctx, "vision_gen0", teacher, sets, params).skipped


@register_method("tsd", TsdParams)
def run(cfg: RunConfig, params: TsdParams, ctx: RunContext) -> dict[str, float]:
    """Teacher on labeled images → stored pseudo-boxes → student (Eq. 2); evaluate both."""
    data = StudyData.from_config(cfg.data)
    sets = split_train(data)
    eval_set = data.dataset(params.eval_split, with_truth=True)
    if not len(eval_set):
        raise ConfigError(f"method.params.eval_split: split {params.eval_split!r} has no images")
    teacher, fresh = vision_generation0(ctx, cfg, params, sets, data.num_classes)
    out = {f"teacher/{k}": v for k, v in headline(evaluate_vision(
        ctx, teacher, eval_set, params, [ctx.run_dir.path / "eval_vision_gen0"])).items()}
    pseudo = stored_detections(ctx, teacher, sets, 0, params, fresh)
    student = build_detector(cfg.model, data.num_classes, cfg.train.seed + 1)  # a new student, random init
    _, totals = distill_detector(ctx, "vision_gen1", student, sets, pseudo, params,
                                 PlainPseudoLabels(data.class_names), cfg.train.seed + 1)
    write_json(ctx.run_dir.path / "pseudo_counts.json", {"vision_gen1": totals.totals})
    metrics = evaluate_vision(ctx, student, eval_set, params, [ctx.run_dir.path / "eval_vision_gen1", ctx.run_dir.eval])
    out.update({f"student/{k}": v for k, v in headline(metrics).items()})
    ctx.console.print("TSD: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    if ctx.fabric.is_global_zero:
        export_model(ctx.run_dir.path / "model.pt", student, cfg.model, data.class_names, cfg.data.image_size)
    return {**out, **headline(metrics)}  # unprefixed keys: the run's final model (the student)


__all__ = [
    "CountTotals", "DETECTION_KEYS", "PlainPseudoLabels", "PseudoRefiner", "TrainSets", "TsdParams",
    "batch_split", "build_detector", "class_counts", "distill_detector", "evaluate_vision", "headline",
    "output_rows", "project_detections", "random_view", "split_train",
    "stored_detections", "train_teacher", "vision_generation0", "write_json",
]
