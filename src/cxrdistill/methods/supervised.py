"""Supervised baselines: the lower bound every semi-supervised recipe is measured against.

Each baseline trains one model on the labeled images of the training split only, with the same
network, schedule and evaluation as the recipes that also use the rest of the archive:

- ``supervised_detector``: RetinaNet on the box images D_B (focal + box loss).
- ``supervised_multitask``: RetinaNet on D_B plus an image-level head (global average pool of the
  backbone's last map → linear) trained with BCE on every image with image labels
  (D_B ∪ D_W). The detector loss only sees D_B; D_W shapes the shared backbone.
- ``supervised_heatmap``: the FPN probability-map network on R ∪ N (pixel BCE on the box masks of D_B
  and the all-zero maps of the absent classes of D_W): the shared heat-map stage, which is AALS's
  pre-training at the same key (``augment: aals`` matches AALS's default ``pretrain_augment``).
- ``supervised_classifier``: the image classifier on D_B ∪ D_W image labels (masked BCE).
- ``supervised_report``: a TF-IDF report classifier on the reports of D_B ∪ D_W, scored on the
  test reports (how much a report alone tells).

``supervised_detector`` is the shared supervised stage of :mod:`cxrdistill.methods.kit`: the
teachers of TSD, CEIRD and STAC (and the burn-in / base stages of the other recipes at the same
steps) are *this* checkpoint, read from the stage store when it was trained once.
``method.params.extra_steps`` gives the compute-matched control (the teacher trained as many more
steps as a student took).
Final evaluation goes to ``run_dir/eval`` (``predictions.json``, ``image_scores.json``,
``metrics.json``), and the flat headline metrics are returned.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from cxrdistill.config import RunConfig
from cxrdistill.data.study import StudyData
from cxrdistill.data.views import random_view
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.eval.runs import (
    evaluate_classifier,
    evaluate_detections,
    evaluate_heatmap,
    evaluate_image_scores,
    predict_detections,
    predict_image_scores,
)
from cxrdistill.methods.kit import (
    Augment,
    boxed_indices,
    build_detector,
    evaluate_final,
    evaluate_stage,
    labeled_loader,
    step_generator,
    supervised_stage,
    view_config,
)
from cxrdistill.methods.registry import register_method
from cxrdistill.models.classifier import masked_bce_with_logits
from cxrdistill.models.detector import RetinaNet


class SupervisedParams(BaseModel):
    """`method.params` of the supervised baselines."""

    model_config = ConfigDict(extra="forbid")

    augment: Augment = "flip"
    """Training augmentation: horizontal flip (the weak view of every semi-supervised recipe),
    ``strong`` (`ViewConfig.martins_silva`) or none."""
    train_split: str = "train"
    eval_split: str = "test"
    n_boot: int = Field(1000, ge=0)
    """Bootstrap replicates of the AUROC CI in metrics.json."""
    image_loss_weight: float = Field(1.0, ge=0)
    """supervised_multitask: weight of the image-level BCE next to the detection loss."""
    weak_per_batch: int | None = Field(None, ge=0)
    """supervised_multitask: D_W images per batch (None: `train.unlabeled_batch_size`, or `train.batch_size` when 0)."""
    extra_steps: int = Field(0, ge=0)
    """supervised_detector: train ``train.max_steps + extra_steps`` steps (the compute-matched control:
    set it to the student steps of the recipe it is matched to; one cosine schedule over the total)."""
    topk_candidates: int = Field(1000, ge=1)
    """supervised_detector: decoding candidates of the evaluation (match the recipes' ``topk_candidates``)."""
    predict_batch_size: int = Field(32, ge=1)


# =============================================================================== detector


@register_method("supervised_detector", SupervisedParams)
def run_detector(cfg: RunConfig, params: SupervisedParams, ctx: RunContext) -> dict[str, float]:
    """RetinaNet trained on the box images of the training split only."""
    data = StudyData.from_config(cfg.data)
    stage = supervised_stage(ctx, data, steps=cfg.train.max_steps + params.extra_steps, augment=params.augment,
                             split=params.train_split)
    held_out = data.dataset(params.eval_split)
    return evaluate_final(ctx, lambda: evaluate_stage(ctx, stage, held_out, split=params.eval_split,
                                                      n_boot=params.n_boot, topk_candidates=params.topk_candidates,
                                                      out_dirs=[ctx.run_dir.eval],
                                                      batch_size=params.predict_batch_size),
                          "supervised detector", stage.model, data.class_names)


# =============================================================================== multi-task


class MultiTaskDetector(nn.Module):
    """A RetinaNet with an image-level head on its last backbone map (global average pool → linear).

    ``forward(images (B, 1, H, W)) -> (DetectorOutput, image_logits (B, C))``.
    """

    def __init__(self, detector: RetinaNet) -> None:
        super().__init__()
        self.detector = detector
        channels: list[int] = detector.backbone.out_channels  # type: ignore[assignment]  # nn.Module.__getattr__ types it Tensor | Module
        self.image_head = nn.Linear(channels[-1], detector.num_classes)
        nn.init.zeros_(self.image_head.bias)

    def forward(self, images: Tensor) -> tuple[Any, Tensor]:
        out = self.detector(images)
        return out, self.image_head(out.backbone_feature.mean(dim=(2, 3)))

    @torch.no_grad()
    def image_probabilities(self, images: Tensor) -> Tensor:
        """``(B, C)`` sigmoid of the image head."""
        return torch.sigmoid(self.forward(images)[1].float())


def multitask_losses(model: MultiTaskDetector, images: Tensor, targets: list[dict[str, Tensor]],
                     has_boxes: Tensor, image_labels: Tensor, has_image_labels: Tensor,
                     image_loss_weight: float) -> dict[str, Tensor]:
    """Detection loss on the box images only (per-image weight 0 elsewhere) + masked image BCE."""
    out, image_logits = model(images)
    det = model.detector.loss(out, targets, weights=has_boxes.to(images.dtype))
    mask = has_image_labels.to(images.dtype)[:, None].expand_as(image_logits)
    image = masked_bce_with_logits(image_logits, image_labels.to(images.dtype), mask)
    return {**det, "image": image * image_loss_weight}


@register_method("supervised_multitask", SupervisedParams)
def run_multitask(cfg: RunConfig, params: SupervisedParams, ctx: RunContext) -> dict[str, float]:
    """RetinaNet on D_B plus an image-level head on D_B ∪ D_W (a shared backbone)."""
    data = StudyData.from_config(cfg.data)
    model = MultiTaskDetector(build_detector(cfg.model, data.num_classes))
    train = data.dataset(params.train_split, supervision=("box", "image"))
    boxed = boxed_indices(train)
    weak = [i for i, im in enumerate(train.images) if im.supervision == "image"]
    per_weak = params.weak_per_batch if params.weak_per_batch is not None else \
        (cfg.train.unlabeled_batch_size or cfg.train.batch_size)
    loader, sampler = labeled_loader(train, boxed, weak, cfg.train.batch_size, per_weak, cfg.train.seed, ctx)
    view = view_config(params.augment)
    model.train()

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        seen = random_view(batch["image"], view, step_generator(cfg.train.seed, step), batch["boxes"], batch["labels"])
        return multitask_losses(model, seen.images, seen.targets, batch["has_boxes"], batch["image_labels"],
                                batch["has_image_labels"], params.image_loss_weight)

    ctx.trainer("multitask").fit(step_fn, {"model": model}, build_optimizer(model.parameters(), cfg.train),
                                 loader, cfg.train.max_steps, sampler=sampler)
    held_out = data.dataset(params.eval_split)

    def evaluate() -> dict[str, Any]:
        model.eval()
        dets = predict_detections(model.detector, held_out)
        ids, scores = predict_image_scores(model.image_probabilities, held_out, device=ctx.device)
        order = {i: k for k, i in enumerate(ids)}
        aligned = np.stack([scores[order[rec.id]] for rec in held_out.images]) if len(ids) else scores
        return evaluate_detections(dets, held_out, ctx.run_dir.eval, split=params.eval_split, n_boot=params.n_boot,
                                   image_scores=aligned)

    return evaluate_final(ctx, evaluate, "supervised multi-task detector")


# =============================================================================== heat map


class HeatmapParams(SupervisedParams):
    """`method.params` of ``supervised_heatmap``."""

    froc_boot: int = Field(200, ge=0)
    """Bootstrap replicates for the modified-FROC CI (0: no CI), as AALS's ``froc_boot``."""


@register_method("supervised_heatmap", HeatmapParams)
def run_heatmap(cfg: RunConfig, params: HeatmapParams, ctx: RunContext) -> dict[str, float]:
    """The FPN probability map trained with pixel BCE on R ∪ N: box masks of D_B, all-zero maps of the
    absent classes of D_W (the shared heat-map stage: AALS's pre-training at the same key)."""
    data = StudyData.from_config(cfg.data)
    model = supervised_stage(ctx, data, kind="heatmap", augment=params.augment, split=params.train_split).model
    held_out = data.dataset(params.eval_split, with_truth=True)  # the truth boxes: the modified FROC's bootstrap
    return evaluate_final(ctx, lambda: evaluate_heatmap(model, held_out, ctx.run_dir.eval, split=params.eval_split,
                                                        n_boot=params.n_boot, froc_boot=params.froc_boot),
                          "supervised heat map",
                          model, data.class_names)


# =============================================================================== classifier


@register_method("supervised_classifier", SupervisedParams)
def run_classifier(cfg: RunConfig, params: SupervisedParams, ctx: RunContext) -> dict[str, float]:
    """The image classifier trained on the image labels of D_B ∪ D_W."""
    data = StudyData.from_config(cfg.data)
    # stage "classifier" (its checkpoint folder and loader seed as before the shared stage)
    model = supervised_stage(ctx, data, kind="classifier", augment=params.augment, split=params.train_split,
                             stage="classifier").model
    held_out = data.dataset(params.eval_split)
    return evaluate_final(ctx, lambda: evaluate_classifier(model, held_out, ctx.run_dir.eval, split=params.eval_split,
                                                           n_boot=params.n_boot), "supervised classifier",
                          model, data.class_names)


# =============================================================================== report


class ReportParams(SupervisedParams):
    """`method.params` of ``supervised_report`` (a TF-IDF + logistic-regression report classifier)."""

    C: float = Field(4.0, gt=0)
    """Inverse L2 strength of each logistic regression."""


@register_method("supervised_report", ReportParams)
def run_report(cfg: RunConfig, params: ReportParams, ctx: RunContext) -> dict[str, float]:
    """A report classifier fitted on the reports of D_B ∪ D_W, scored on the held-out reports.

    Fitting is a closed-form solver (no optimizer steps): the fitted model is saved to
    ``checkpoints/report/`` and loaded back on a rerun.
    """
    from cxrdistill.models.report import TfidfReportClassifier

    data = StudyData.from_config(cfg.data)
    train = data.dataset(params.train_split, supervision=("box", "image"))
    held_out = data.dataset(params.eval_split)
    saved = ctx.run_dir.stage_dir("report")
    if (saved / "config.json").is_file():
        model = TfidfReportClassifier.load(saved)
    else:
        texts = [im.report or "" for im in train.images]
        targets = np.stack([data.manifest.image_labels(im.id) for im in train.images])
        model = TfidfReportClassifier(num_classes=data.num_classes, C=params.C, empty="allow")
        model.fit(texts, targets)
        if ctx.fabric.is_global_zero:
            model.save(saved)
    ids = [im.id for im in held_out.images]
    scores = model.predict_proba([im.report or "" for im in held_out.images])
    return evaluate_final(ctx, lambda: evaluate_image_scores(ids, scores, held_out, ctx.run_dir.eval,
                                                             split=params.eval_split, n_boot=params.n_boot),
                          "supervised report classifier")


__all__ = [
    "HeatmapParams", "MultiTaskDetector", "ReportParams", "SupervisedParams", "multitask_losses", "run_classifier", "run_detector",
    "run_heatmap", "run_multitask", "run_report",
]
