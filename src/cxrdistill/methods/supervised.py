"""Supervised baselines: the lower bound every semi-supervised recipe is measured against.

Each baseline trains one model on the labeled images of the training split only, with the same
network, schedule and evaluation as the recipes that also use the rest of the archive:

- ``supervised_detector``: RetinaNet on the box images D_B (focal + box loss).
- ``supervised_multitask``: RetinaNet on D_B plus an image-level head (global average pool of the
  backbone's last map → linear) trained with BCE on every image with image labels
  (D_B ∪ D_W). The detector loss only sees D_B; D_W shapes the shared backbone.
- ``supervised_heatmap``: the FPN probability-map network on D_B (pixel BCE on box masks).
- ``supervised_classifier``: the image classifier on D_B ∪ D_W image labels (masked BCE).
- ``supervised_report``: a TF-IDF report classifier on the reports of D_B ∪ D_W, scored on the
  test reports (how much a report alone tells).

The helpers here (:func:`build_detector`, :func:`train_detector`, :func:`evaluate_final`,
:func:`augment_batch`) are what the other detection recipes reuse for their teachers, so "the
supervised teacher" of STAC, Mean Teacher or TSD is exactly this baseline.
Final evaluation goes to ``run_dir/eval`` (``predictions.json``, ``image_scores.json``,
``metrics.json``), and the flat headline metrics are returned.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cxrdistill.config import ModelConfig, RunConfig
from cxrdistill.data.dataset import CXRDataset, collate
from cxrdistill.data.study import StudyData
from cxrdistill.data.views import ViewConfig, intensity_jitter, project_boxes, random_affine, warp_images
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.loop import FitResult
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.engine.sampler import RatioBatchSampler
from cxrdistill.errors import ConfigError
from cxrdistill.eval.runs import (
    evaluate_classifier,
    evaluate_detections,
    evaluate_detector,
    evaluate_heatmap,
    evaluate_image_scores,
    predict_detections,
    predict_image_scores,
)
from cxrdistill.methods.registry import register_method
from cxrdistill.models.factory import build_model, export_model
from cxrdistill.models.classifier import ImageClassifier, masked_bce_with_logits
from cxrdistill.models.detector import RetinaNet
from cxrdistill.models.heatmap import HeatmapFPN, boxes_to_masks, pixel_bce_loss

Augment = Literal["flip", "none", "strong"]


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


# =============================================================================== shared helpers


def build_detector(model_cfg: ModelConfig, num_classes: int) -> RetinaNet:
    """The RetinaNet of ``cfg.model`` (``options`` go to :class:`RetinaNet`; ``pretrained``: ImageNet ResNet)."""
    return build_model(model_cfg, num_classes, expect="detector")  # type: ignore[return-value]


def view_config(augment: Augment) -> ViewConfig:
    """The training view of a baseline: flip (weak), the strong list, or identity."""
    return {"flip": ViewConfig.weak(), "strong": ViewConfig.martins_silva(), "none": ViewConfig()}[augment]


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): augmentation is the same after a resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))


def augment_batch(images: Tensor, boxes: list[Tensor], labels: list[Tensor], view: ViewConfig,
                  generator: torch.Generator) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Warp ``images (B, 1, H, W)`` by a random view and carry the boxes along (lost boxes dropped).

    Returns the augmented images and detector targets ``[{"boxes": (K, 4), "labels": (K,)}]``.
    """
    size = (int(images.shape[-2]), int(images.shape[-1]))
    matrices = random_affine(images.shape[0], image_size=size, flip_p=view.flip_p, rotate_deg=view.rotate_deg,
                             translate=view.translate, scale=view.scale, perspective=view.perspective,
                             generator=generator).to(images.device)
    out = intensity_jitter(warp_images(images, matrices), view.intensity, generator)
    targets = []
    for b, l, m in zip(boxes, labels, matrices):
        kept, keep = project_boxes(b, m, size)
        targets.append({"boxes": kept, "labels": l[keep]})
    return out, targets


def labeled_loader(dataset: CXRDataset, first: list[int], second: list[int], n_first: int, n_second: int,
                   seed: int, ctx: RunContext) -> tuple[DataLoader, RatioBatchSampler]:
    """An endless, resumable loader of batches with ``n_first`` items of ``first`` then ``n_second`` of ``second``."""
    sampler = RatioBatchSampler(first, second, n_first, n_second, seed, rank=ctx.rank, world_size=ctx.world_size)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                      num_workers=ctx.cfg.data.num_workers), sampler


def boxed_indices(dataset: CXRDataset) -> list[int]:
    """Indices of the images with supervision "box"; a clear error when there are none."""
    idx = [i for i, im in enumerate(dataset.images) if im.supervision == "box"]
    if not idx:
        raise ConfigError("the training split has no image with boxes (supervision 'box'); "
                          "raise data.boxed_fraction or check the manifest")
    return idx


def train_detector(ctx: RunContext, stage: str, model: RetinaNet, dataset: CXRDataset, augment: Augment,
                   max_steps: int | None = None) -> FitResult:
    """Train ``model`` on the box images of ``dataset`` as stage ``stage`` (resumable); returns the fit."""

    def losses(batch: dict[str, Any], images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        n_boxes = sum(len(t["boxes"]) for t in targets) / len(targets)
        return {**model.loss(model(images), targets), "log_boxes_per_image": torch.tensor(n_boxes)}

    return _fit_on(ctx, stage, model, dataset, boxed_indices(dataset), augment, losses, max_steps)


def _fit_on(ctx: RunContext, stage: str, model: torch.nn.Module, dataset: CXRDataset, indices: list[int],
            augment: Augment, losses: Callable[[dict[str, Any], Tensor, list[dict[str, Tensor]]], dict[str, Tensor]],
            max_steps: int | None) -> FitResult:
    """The supervised loop every baseline shares: batches of ``dataset[indices]``, the ``augment`` view
    (images ``(B, 1, H, W)`` and their projected targets), ``losses(batch, images, targets)``, stage
    ``stage`` of ``train.max_steps`` (or ``max_steps``) optimizer steps, resumable."""
    cfg = ctx.cfg.train
    loader, sampler = labeled_loader(dataset, indices, [], cfg.batch_size, 0, cfg.seed + sum(map(ord, stage)), ctx)
    view = view_config(augment)
    model.train()

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        images, targets = augment_batch(batch["image"], batch["boxes"], batch["labels"], view,
                                        step_generator(cfg.seed, step))
        return losses(batch, images, targets)

    return ctx.trainer(stage).fit(step_fn, {"model": model}, build_optimizer(model.parameters(), cfg), loader,
                                  cfg.max_steps if max_steps is None else max_steps, sampler=sampler)


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat final metrics from an `eval.runs` metrics dict: mAP (mean and per IoU), FROC, macro AUROC."""
    out: dict[str, float] = {}
    det = metrics.get("detection") or {}
    for key, value in det.items():
        if key.startswith(("mAP", "AP_", "AR@")):
            out[key] = _float(value)
    if "froc" in metrics:
        out["froc"] = _float(metrics["froc"].get("mean_score"))
    if "modified_froc_heatmaps" in metrics:
        out["modified_froc"] = _float(metrics["modified_froc_heatmaps"].get("mean_score"))
    cls = metrics.get("classification") or {}
    if "macro_AUROC" in cls:
        out["macro_AUROC"] = _float(cls["macro_AUROC"])
        ci = cls.get("macro_AUROC_CI95") or [None, None]
        out["macro_AUROC_ci_low"], out["macro_AUROC_ci_high"] = _float(ci[0]), _float(ci[1])
    return out


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def evaluate_final(ctx: RunContext, evaluate: Callable[[], dict[str, Any]], title: str,
                   model: nn.Module | None = None, class_names: list[str] | None = None) -> dict[str, float]:
    """Run the final evaluation on rank 0 (it writes ``run_dir/eval``), print and return the headline.

    With `model` (and `class_names`), also export it as ``run_dir/model.pt`` for `cxrdistill predict`.
    """
    metrics: dict[str, float] = {}
    if ctx.fabric.is_global_zero:
        metrics = headline(evaluate())
        print_metrics(ctx, metrics, title)
        if model is not None and class_names is not None:
            export_model(ctx.run_dir.path / "model.pt", model, ctx.cfg.model, class_names, ctx.cfg.data.image_size)
    ctx.fabric.barrier()
    return metrics


def print_metrics(ctx: RunContext, metrics: dict[str, float], title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, "n/a" if math.isnan(value) else f"{value:.4f}")
    ctx.console.print(table)
    ctx.console.final_metrics_printed = True  # `cxrdistill train` then does not print them again


# =============================================================================== detector


@register_method("supervised_detector", SupervisedParams)
def run_detector(cfg: RunConfig, params: SupervisedParams, ctx: RunContext) -> dict[str, float]:
    """RetinaNet trained on the box images of the training split only."""
    data = StudyData.from_config(cfg.data)
    model = build_detector(cfg.model, data.num_classes)
    train_detector(ctx, "supervised", model, data.dataset(params.train_split), params.augment)
    held_out = data.dataset(params.eval_split)
    return evaluate_final(ctx, lambda: evaluate_detector(model, held_out, ctx.run_dir.eval, split=params.eval_split,
                                                         n_boot=params.n_boot), "supervised detector",
                          model, data.class_names)


# =============================================================================== multi-task


class MultiTaskDetector(nn.Module):
    """A RetinaNet with an image-level head on its last backbone map (global average pool → linear).

    ``forward(images (B, 1, H, W)) -> (DetectorOutput, image_logits (B, C))``.
    """

    def __init__(self, detector: RetinaNet) -> None:
        super().__init__()
        self.detector = detector
        self.image_head = nn.Linear(detector.backbone.out_channels[-1], detector.num_classes)
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
        images, targets = augment_batch(batch["image"], batch["boxes"], batch["labels"], view,
                                        step_generator(cfg.train.seed, step))
        return multitask_losses(model, images, targets, batch["has_boxes"], batch["image_labels"],
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


def build_heatmap_model(model_cfg: ModelConfig, num_classes: int) -> HeatmapFPN:
    return build_model(model_cfg, num_classes, expect="heatmap")  # type: ignore[return-value]


@register_method("supervised_heatmap", SupervisedParams)
def run_heatmap(cfg: RunConfig, params: SupervisedParams, ctx: RunContext) -> dict[str, float]:
    """The FPN probability map trained with pixel BCE on the box masks of D_B."""
    data = StudyData.from_config(cfg.data)
    model = build_heatmap_model(cfg.model, data.num_classes)
    train = data.dataset(params.train_split)
    loader, sampler = labeled_loader(train, boxed_indices(train), [], cfg.train.batch_size, 0, cfg.train.seed, ctx)
    view = view_config(params.augment)
    model.train()

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        images, targets = augment_batch(batch["image"], batch["boxes"], batch["labels"], view,
                                        step_generator(cfg.train.seed, step))
        masks = boxes_to_masks([t["boxes"] for t in targets], [t["labels"] for t in targets], data.num_classes,
                               images.shape[-2], images.shape[-1], model.output_stride)
        return {"pixel_bce": pixel_bce_loss(model(images), masks.to(images))}

    ctx.trainer("heatmap").fit(step_fn, {"model": model}, build_optimizer(model.parameters(), cfg.train), loader,
                               cfg.train.max_steps, sampler=sampler)
    held_out = data.dataset(params.eval_split)
    return evaluate_final(ctx, lambda: evaluate_heatmap(model, held_out, ctx.run_dir.eval, split=params.eval_split,
                                                        n_boot=params.n_boot), "supervised heat map",
                          model, data.class_names)


# =============================================================================== classifier


def build_classifier_model(model_cfg: ModelConfig, num_classes: int) -> ImageClassifier:
    return build_model(model_cfg, num_classes, expect="classifier")  # type: ignore[return-value]


def image_labeled(dataset: CXRDataset) -> list[int]:
    idx = [i for i, im in enumerate(dataset.images) if im.supervision in ("box", "image")]
    if not idx:
        raise ConfigError("the training split has no image with image-level labels (supervision 'box' or 'image')")
    return idx


def train_classifier(ctx: RunContext, stage: str, model: ImageClassifier, dataset: CXRDataset, augment: Augment,
                     max_steps: int | None = None) -> FitResult:
    """Train ``model`` with masked BCE on the image labels of ``dataset``'s labeled images (stage ``stage``)."""

    def losses(batch: dict[str, Any], images: Tensor, _: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        mask = batch["has_image_labels"].to(images.dtype)[:, None].expand_as(batch["image_labels"])
        return {"bce": masked_bce_with_logits(model(images), batch["image_labels"], mask)}

    return _fit_on(ctx, stage, model, dataset, image_labeled(dataset), augment, losses, max_steps)


@register_method("supervised_classifier", SupervisedParams)
def run_classifier(cfg: RunConfig, params: SupervisedParams, ctx: RunContext) -> dict[str, float]:
    """The image classifier trained on the image labels of D_B ∪ D_W."""
    data = StudyData.from_config(cfg.data)
    model = build_classifier_model(cfg.model, data.num_classes)
    train_classifier(ctx, "classifier", model, data.dataset(params.train_split), params.augment)
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
    "MultiTaskDetector", "ReportParams", "SupervisedParams", "augment_batch", "boxed_indices", "build_detector",
    "build_classifier_model", "build_heatmap_model", "evaluate_final", "headline", "labeled_loader",
    "multitask_losses", "step_generator", "train_classifier", "train_detector", "view_config",
]
