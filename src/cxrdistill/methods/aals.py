"""AALS: knowledge distillation with adaptive asymmetric label sharpening (Wang et al., MICCAI 2021).

Three kinds of training image, per class (Sec. 2, "Problem Setup"):

- **R**: region-level labels (supervision ``"box"``); every class has a box mask (1 in boxes).
- **N**: image-level negative (supervision ``"image"``, class absent): an all-zero mask.
- **P**: image-level positive (supervision ``"image"``, class present): no mask; a pseudo map.

Images with supervision ``"none"`` are not part of the paper's setup and are left out (counted).

1. **Supervised pre-training** (Eq. 1) on R ∪ N: pixel-wise BCE between the FPN probability map
   and the rasterised masks (:mod:`~cxrdistill.models.heatmap_targets`). This is the shared
   supervised stage (``kit.supervised_stage(kind="heatmap")``, stage ``supervised``): the
   `supervised_heatmap` baseline at the same key is the same checkpoint, trained once.
2. **Semi-supervised training**: teacher and student start from the pre-trained weights; the
   teacher is the EMA of the student (Eq. 2, α = 0.999, :class:`~cxrdistill.engine.ema.EMATeacher`).
   R and N keep L_sup; on P the teacher's map is sharpened by AALS (Eqs. 6–7, t = 0.4, a0 = 4,
   target max(S(y), y): :func:`~cxrdistill.pseudo.sharpening.asymmetric_sharpen`) and the student
   learns it by the KL loss (Eq. 4, :func:`~cxrdistill.pseudo.sharpening.kl_map_loss`).
   L = L_sup + L_semi (Eq. 5).

Both losses are sums over images in the paper; here each is a mean over its own maps, weighted by
its share of the batch's (image, class) maps, which is Eq. (5) up to one constant factor.

Switches (``method.params``): ``semi_supervised: false`` stops after pre-training (the paper's
"Supervised pre-training" row), ``a0: 1`` is the plain mean teacher (no sharpening),
``positive_fraction`` uses a seeded, nested subset of P (Fig. 3: 0 / 20 / 60 / 100 %).

Augmentation and model selection (Sec. 3, "Implementation details"): every training image gets a
random rotation, horizontal flip, intensity and contrast jitter (``augment: true``). In the semi
stage teacher and student see *different* random views of the same image; each view's geometry is
recorded as a 3x3 matrix (:mod:`cxrdistill.data.views`), boxes are projected into the student's
view before they are rasterised, and the teacher's probability maps are warped from its view into
the student's (pixels the teacher did not see carry no L_semi). ``augment: false`` is the earlier
behaviour (no augmentation, one view for both). The model is evaluated on the validation split
once per epoch (``val_every``) and the checkpoint with the highest validation AUROC is kept
(``select_best``) in stage 2: the EMA teacher (with the student of the same step); that teacher is
the exported model. Stage 1 keeps the shared stage's final weights (one checkpoint per key).

Image score = the maximum of the class map; metrics: AUROC with bootstrap CI and the AALS
modified FROC (recall at 1–10 % false-positive pixels), also with a bootstrap CI.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.utils.data import DataLoader

from cxrdistill.atomic import write_json_atomic
from cxrdistill.config import RunConfig
from cxrdistill.data.dataset import CXRDataset, collate
from cxrdistill.data.study import StudyData
from cxrdistill.data.views import View, ViewConfig, compose, invert, random_view, warp_images
from cxrdistill.engine.checkpoint import load_checkpoint, load_module_weights
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.ema import EMATeacher
from cxrdistill.engine.loop import Trainer
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.errors import ConfigError
from cxrdistill.eval.classification import auroc
from cxrdistill.eval.runs import evaluate_heatmap
from cxrdistill.methods.kit import (
    Augment,
    Stage,
    build_heatmap_model,
    headline,
    labeled_loader,
    module_as,
    stage_metrics,
    supervised_stage,
)
from cxrdistill.methods.registry import register_method
from cxrdistill.models.factory import export_model
from cxrdistill.models.heatmap import HeatmapFPN, image_scores
from cxrdistill.models.heatmap_targets import MapTargets, map_supervised_indices, map_targets, supervised_map_loss
from cxrdistill.pseudo.sharpening import asymmetric_sharpen, kl_map_loss


class AalsParams(BaseModel):
    """Parameters of the AALS recipe; defaults are the paper's values."""

    model_config = ConfigDict(extra="forbid")

    semi_supervised: bool = True
    """False: stop after supervised pre-training on R ∪ N (Table 1, "Supervised pre-training")."""
    t: float = Field(0.4, gt=0.0, lt=1.0)
    """Sharpening centre of Eq. (6); t = 0.4 in the paper (Table 2 sweeps 0.2–0.5)."""
    a0: float = Field(4.0, ge=1.0)
    """Largest sharpening strength of Eq. (7); 4 in the paper, 1 = no sharpening (mean teacher)."""
    ema_decay: float = Field(0.999, ge=0.0, le=1.0)
    """α of Eq. (2), 0.999 following Mean Teacher."""
    positive_fraction: float = Field(1.0, ge=0.0, le=1.0)
    """Fraction of the P images whose positive labels are used (Fig. 3); a nested seeded subset."""
    pretrain_steps: int | None = Field(None, ge=0)
    """Optimizer steps of supervised pre-training (None: ``train.max_steps``)."""
    pretrain_augment: Augment = "aals"
    """View of the pre-training (the shared heat-map stage's ``augment``; ``aals``: flip 0.5, rotation
    ±10°, contrast ±0.2, brightness ±0.1, the defaults of the semi stage's view). The
    `supervised_heatmap` baseline with ``augment: aals`` is the same checkpoint."""
    semi_steps: int | None = Field(None, ge=0)
    """Optimizer steps of semi-supervised training (None: ``train.max_steps``)."""
    positives_per_batch: int | None = Field(None, ge=1)
    """P images per batch next to ``train.batch_size`` R ∪ N images (None: ``train.unlabeled_batch_size``,
    or ``train.batch_size`` when that is 0)."""
    pretrained_checkpoint: Path | None = None
    """Skip pre-training and start from this checkpoint's ``model`` (or ``student``) weights (e.g. another
    run's ``checkpoints/supervised/last.pt``). Sweeps share one pre-training without it: the stage store."""
    eval_split: str = "test"
    eval_batch_size: int = Field(16, ge=1)
    n_boot: int = Field(1000, ge=0)
    """Bootstrap replicates for the AUROC CI."""
    froc_boot: int = Field(200, ge=0)
    """Bootstrap replicates for the modified-FROC CI (0: no CI)."""
    detection_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """Map threshold whose connected regions are written as boxes to predictions.json."""
    augment: bool = True
    """The paper's training augmentation (rotation, flip, intensity and contrast jitter), with
    different views for teacher and student; False: no augmentation, one view for both."""
    rotate_deg: float = Field(10.0, ge=0.0)
    """Largest absolute rotation (the paper gives no range)."""
    flip_p: float = Field(0.5, ge=0.0, le=1.0)
    intensity: float = Field(0.1, ge=0.0)
    """Brightness jitter: a shift drawn from ±intensity (images in [0, 1])."""
    contrast: float = Field(0.2, ge=0.0, lt=1.0)
    """Contrast jitter: a factor drawn from 1 ± contrast about the image mean."""
    select_best: bool = True
    """Keep the checkpoint with the highest validation AUROC (paper); False: the final weights."""
    val_split: str = "val"
    """Split of the model selection (must differ from ``eval_split``)."""
    val_every: int | None = Field(None, ge=1)
    """Validate every this many steps (None: once per epoch of the stage's training images)."""


# --------------------------------------------------------------------------------- the three sets


@dataclass
class TrainingSets:
    """Indices into ``dataset`` of the images that supervise each stage.

    ``supervised``: images with at least one supervised map (R, or an N class) — the pre-training
    pool. ``positive``: images with at least one used P class. ``positive_ids``: their image ids.
    """

    dataset: CXRDataset
    supervised: list[int]
    positive: list[int]
    positive_ids: Tensor
    counts: dict[str, dict[str, int]]
    unused: int


def nested_subset(ids: list[int], fraction: float, seed: int) -> list[int]:
    """A seeded subset of ``round(fraction * len(ids))`` ids; subsets of one seed are nested."""
    ordered = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:aals-p:{i}".encode()).hexdigest())
    return sorted(ordered[: round(fraction * len(ordered))])


def split_sets(data: StudyData, positive_fraction: float, seed: int, split: str = "train") -> TrainingSets:
    """R, N and P of ``split`` (per class), with ``positive_fraction`` of the P images kept."""
    dataset = data.dataset(split, supervision=("box", "image", "none"))
    manifest, names = data.manifest, data.class_names
    counts = {name: {"R": 0, "N": 0, "P": 0, "P_used": 0} for name in names}
    weak_positive: list[int] = []
    for im in dataset.images:
        if im.supervision == "image" and manifest.image_labels(im.id).any():
            weak_positive.append(im.id)
    used = set(nested_subset(weak_positive, positive_fraction, seed))
    supervised, positive, unused = map_supervised_indices(dataset), [], 0
    for index, im in enumerate(dataset.images):
        labels = manifest.image_labels(im.id)
        if im.supervision == "box":
            for name in names:
                counts[name]["R"] += 1
        elif im.supervision == "image":
            if im.id in used:
                positive.append(index)
            for k, name in enumerate(names):
                kind = "P" if labels[k] else "N"
                counts[name][kind] += 1
                if kind == "P" and im.id in used:
                    counts[name]["P_used"] += 1
        else:
            unused += 1
    if not supervised:
        raise ConfigError(f"AALS: split {split!r} has no image with boxes or image-level negatives (R ∪ N is empty)")
    return TrainingSets(dataset, supervised, positive, torch.tensor(sorted(used), dtype=torch.long), counts, unused)


# --------------------------------------------------------------------------------- targets and losses


def aals_losses(student_logits: Tensor, teacher_probs: Tensor, targets: MapTargets, t: float, a0: float,
                seen: Tensor | None = None) -> dict[str, Tensor]:
    """L_sup and L_semi (Eqs. 1, 4–7) of one batch, each weighted by its share of the counted maps.

    ``teacher_probs (B, C, h, w)``: the teacher's probability maps (in the student's view).
    ``seen (B, 1, h, w)``: where the teacher's view covers the student's (None: everywhere); L_semi
    counts only those pixels. Returns ``{"sup", "semi"}`` plus ``log_teacher_max`` /
    ``log_target_max`` (mean over P maps of the map maximum).
    """
    n_sup, n_pos = targets.supervised.sum(), targets.positive.sum()
    total = (n_sup + n_pos).clamp(min=1.0)
    sharpened = asymmetric_sharpen(teacher_probs, t=t, a0=a0)
    mask = targets.positive[:, :, None, None]
    if seen is not None:
        mask = mask * seen
    semi = kl_map_loss(student_logits, sharpened, mask=mask)
    out = {"sup": supervised_map_loss(student_logits, targets) * (n_sup / total), "semi": semi * (n_pos / total)}
    if n_pos > 0:
        weight = targets.positive
        out["log_teacher_max"] = (teacher_probs.flatten(2).amax(2) * weight).sum() / n_pos
        out["log_target_max"] = (sharpened.flatten(2).amax(2) * weight).sum() / n_pos
    return out



# --------------------------------------------------------------------------------- views


def view_config(params: AalsParams) -> ViewConfig | None:
    """The paper's training view (rotation, flip, intensity and contrast jitter); None: no augmentation."""
    if not params.augment:
        return None
    return ViewConfig(flip_p=params.flip_p, rotate_deg=params.rotate_deg, contrast=params.contrast,
                      brightness=params.intensity)


def map_matrices(source: Tensor, target: Tensor, stride: int) -> Tensor:
    """``(B, 3, 3)``: map-pixel coordinates of the ``source`` view -> those of the ``target`` view,
    for views ``(B, 3, 3)`` in image pixels and maps at ``stride`` (map coordinate = pixel / stride)."""
    scale = torch.diag(torch.tensor([1.0 / stride, 1.0 / stride, 1.0], dtype=torch.float64))
    between = compose(invert(source.detach().cpu().double()), target.detach().cpu().double())
    inverse: Tensor = torch.linalg.inv(scale)
    return (scale @ between @ inverse).float().to(source.device)


def project_maps(maps: Tensor, matrices: Tensor) -> tuple[Tensor, Tensor]:
    """Warp ``maps (B, C, h, w)`` by ``matrices (B, 3, 3)`` (map pixels); returns the warped maps and
    ``valid (B, 1, h, w)``: 1 where the target pixel was seen by the source view."""
    warped = warp_images(maps, matrices)
    seen = warp_images(torch.ones_like(maps[:, :1]), matrices) > 0.999
    return warped, seen.to(maps.dtype)


def _view_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The views' random stream: a function of (seed, stage, step) only, so a resumed run draws the same views."""
    digest = hashlib.sha256(f"{seed}:aals-views:{stage}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def view_pair(batch: dict[str, Any], params: AalsParams, seed: int, stage: str, step: int) -> tuple[View, View]:
    """(teacher view, student view): two independent random views (`data.views.random_view`, boxes
    keeping < 50 % of their area dropped), or the batch itself twice."""
    images, boxes, labels = batch["image"], batch["boxes"], batch["labels"]
    cfg = view_config(params)
    if cfg is None:
        view = random_view(images, None, None, boxes, labels)
        return view, view
    generator = _view_generator(seed, stage, step)
    return random_view(images, cfg, generator, boxes, labels), random_view(images, cfg, generator, boxes, labels)


# --------------------------------------------------------------------------------- model selection


@torch.no_grad()
def validation_auroc(model: torch.nn.Module, dataset: CXRDataset, batch_size: int) -> float:
    """Macro AUROC (classes with both labels) of the map-maximum image scores on ``dataset``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores, truth = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        scores.append(image_scores(model(batch["image"].to(device)).float()).cpu())
        truth.append(batch["truth_image_labels"])
    model.train(was_training)
    per_class = auroc(torch.cat(truth).numpy(), torch.cat(scores).numpy())
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else math.nan


def _selection_trainer(ctx: RunContext, params: AalsParams, stage: str, epoch_images: int, per_step: int) -> Trainer:
    """A trainer for ``stage`` that validates once per epoch (``epoch_images`` at ``per_step`` images
    per optimizer step) and keeps ``best.pt`` by ``val_AUROC``."""
    cfg = ctx.cfg.train
    if params.select_best:
        every = params.val_every or max(1, math.ceil(epoch_images / max(per_step, 1)))
        cfg = cfg.model_copy(update={"best_metric": "val_AUROC", "best_mode": "max", "eval_every": every})
    return Trainer(cfg, ctx.run_dir, stage, fabric=ctx.fabric, console=ctx.console)


def _load_best(trainer: Trainer, result: Any, modules: dict[str, torch.nn.Module]) -> None:
    """Load ``best.pt`` (when the stage selected one) into ``modules``."""
    if result.best is None or not trainer.best_path.is_file():
        return
    state = load_checkpoint(trainer.best_path)
    for name, module in modules.items():
        module.load_state_dict(state["modules"][name])


# --------------------------------------------------------------------------------- the recipe


def _validator(model: torch.nn.Module, val_set: CXRDataset | None,
               params: AalsParams) -> Callable[[], dict[str, float]] | None:
    if val_set is None:
        return None
    return lambda: {"val_AUROC": validation_auroc(model, val_set, params.eval_batch_size)}


def pretrain(ctx: RunContext, data: StudyData, params: AalsParams) -> Stage | None:
    """Stage 1: supervised pre-training on R ∪ N (Eq. 1): the shared supervised heat-map stage
    (`kit.supervised_stage(kind="heatmap")`, the `supervised_heatmap` baseline's checkpoint at the same
    key, read from the stage store when trained once). None with ``pretrained_checkpoint``."""
    if params.pretrained_checkpoint is not None:
        return None
    return supervised_stage(ctx, data, kind="heatmap", steps=params.pretrain_steps, augment=params.pretrain_augment)


def pretrained_model(ctx: RunContext, data: StudyData, params: AalsParams) -> HeatmapFPN:
    """The pre-trained heat-map network: :func:`pretrain`'s stage model, or ``pretrained_checkpoint``'s
    ``model`` (a stage checkpoint, e.g. ``checkpoints/supervised/last.pt``) or ``student`` weights."""
    stage = pretrain(ctx, data, params)
    if stage is not None:
        return stage.model  # type: ignore[return-value]
    model = build_heatmap_model(ctx.cfg.model, data.num_classes, ctx.cfg.train.seed)
    path = params.pretrained_checkpoint
    assert path is not None  # pretrain() returns None only with a pretrained_checkpoint
    modules = load_checkpoint(path).get("modules", {})
    load_module_weights(path, model, "student" if "student" in modules else "model")
    return model.to(ctx.device)


def distill(cfg: RunConfig, params: AalsParams, ctx: RunContext, sets: TrainingSets, student: HeatmapFPN,
            val_set: CXRDataset | None = None) -> EMATeacher:
    """Stage 2: the mean teacher with AALS on R ∪ N ∪ P (Eqs. 2–7); returns the EMA teacher (with
    ``select_best``: the teacher of the best validation AUROC, and the student of that step)."""
    teacher = EMATeacher(student, decay=params.ema_decay)  # both start from the pre-trained weights
    per_batch = params.positives_per_batch or cfg.train.unlabeled_batch_size or cfg.train.batch_size
    loader, sampler = labeled_loader(sets.dataset, sets.supervised, sets.positive, cfg.train.batch_size, per_batch,
                              cfg.train.seed + 1, ctx)
    optimizer = build_optimizer(student.parameters(), cfg.train)
    trainer = _selection_trainer(ctx, params, "semi", len(sets.supervised) + len(sets.positive),
                                 cfg.train.batch_size + (per_batch if sets.positive else 0))

    def step(batch: dict[str, Any], index: int) -> dict[str, Tensor]:
        teacher_view, student_view = view_pair(batch, params, cfg.train.seed, "semi", index)
        targets = map_targets(batch, student.num_classes, student.output_stride, sets.positive_ids, student_view)
        with torch.no_grad():
            teacher_probs = torch.sigmoid(teacher(teacher_view.images))
        seen = None
        if params.augment:  # the teacher's maps, moved from its view into the student's
            matrices = map_matrices(teacher_view.matrices, student_view.matrices, student.output_stride)
            teacher_probs, seen = project_maps(teacher_probs, matrices)
        losses = aals_losses(student(student_view.images), teacher_probs, targets, params.t, params.a0, seen)
        losses["log_n_positive_maps"] = targets.positive.sum()
        return losses

    steps = cfg.train.max_steps if params.semi_steps is None else params.semi_steps
    evaluate = _validator(teacher.module, val_set, params) if params.select_best else None
    modules = {"student": student, "teacher": teacher}
    result = trainer.fit(step, modules, optimizer, loader, steps, sampler=sampler,
                         on_step_end=lambda _: teacher.update(student), evaluate=evaluate)
    _load_best(trainer, result, modules)
    return teacher


@register_method("aals", AalsParams)
def run(cfg: RunConfig, params: AalsParams, ctx: RunContext) -> dict[str, float]:
    """Pre-train on R ∪ N, then (unless switched off) distil with AALS; evaluate each model."""
    torch.manual_seed(cfg.train.seed)
    data = StudyData.from_config(cfg.data)
    sets = split_sets(data, params.positive_fraction, cfg.train.seed)
    if ctx.fabric.is_global_zero:
        write_json_atomic(ctx.run_dir.path / "aals_sets.json", {"per_class": sets.counts, "unused_none": sets.unused,
                                                                "supervised_images": len(sets.supervised),
                                                                "positive_images": len(sets.positive)})
    if sets.unused:
        ctx.console.print(f"AALS: {sets.unused} training images with supervision 'none' are not used")
    eval_set = data.dataset(params.eval_split, with_truth=True)
    if len(eval_set) == 0:
        raise ConfigError(f"method.params.eval_split: split {params.eval_split!r} has no images")
    val_set = None
    if params.select_best:
        if params.val_split == params.eval_split:
            raise ConfigError(f"method.params.val_split: model selection on the evaluation split "
                              f"{params.eval_split!r} would select on the test set; name another split "
                              f"or set select_best: false")
        val_set = data.dataset(params.val_split, with_truth=True)
        if len(val_set) == 0:
            raise ConfigError(f"method.params.val_split: split {params.val_split!r} has no images; "
                              f"name another split or set select_best: false")
    student = pretrained_model(ctx, data, params)
    out = headline(evaluate(student, eval_set, ctx.run_dir.eval / "pretrain", params), "pretrain")
    if not params.semi_supervised:
        return _finish(ctx, data, student, "pretrain", out)
    if not sets.positive:
        ctx.console.print("AALS: no used image-level positives (P is empty): the semi stage trains on R ∪ N only")
    student.train()
    teacher = distill(cfg, params, ctx, sets, student, val_set)
    for name, model in (("student", student), ("teacher", teacher.module)):
        out.update(headline(evaluate(model, eval_set, ctx.run_dir.eval / name, params), name))
    return _finish(ctx, data, module_as(teacher.module, HeatmapFPN), "teacher", out)


def _finish(ctx: RunContext, data: StudyData, model: HeatmapFPN, name: str, out: dict[str, float]) -> dict[str, float]:
    """The run's final model is `name` (the EMA teacher after distillation): its evaluation files go to
    ``eval/`` (what `cxrdistill report` reads), its weights to ``model.pt``, its metrics unprefixed."""
    if ctx.fabric.is_global_zero:
        for file in ("metrics.json", "predictions.json", "image_scores.json"):
            if (ctx.run_dir.eval / name / file).is_file():
                shutil.copyfile(ctx.run_dir.eval / name / file, ctx.run_dir.eval / file)
        export_model(ctx.run_dir.path / "model.pt", model, ctx.cfg.model, data.class_names, ctx.cfg.data.image_size)
    return {**out, **stage_metrics(out, name)}


# --------------------------------------------------------------------------------- evaluation


def evaluate(model: torch.nn.Module, dataset: CXRDataset, out_dir: Path, params: AalsParams) -> dict[str, Any]:
    """:func:`~cxrdistill.eval.runs.evaluate_heatmap`: AUROC with CIs, the modified FROC (with its
    bootstrap CI when ``froc_boot > 0``), files in ``out_dir``."""
    return evaluate_heatmap(model, dataset, out_dir, batch_size=params.eval_batch_size,
                            box_threshold=params.detection_threshold, n_boot=params.n_boot,
                            froc_boot=params.froc_boot)
