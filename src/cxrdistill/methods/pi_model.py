"""Π-model (Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017, Sec. 2.1)
for multi-label chest X-ray classification.

Every training image is seen under two independent stochastic augmentations; the network's two
predictions ``z, z̃`` must agree. Labeled images (image labels: supervision "box" or "image") also
pay the masked BCE. Per step:

    L = BCE(z_labeled, y) + w(t) · mean_{all images} ‖σ(z) − σ(z̃)‖² / C

with the paper's Gaussian ramp-up ``w(t) = w_max · exp(−5 (1 − t/T)²)`` for t < T (T = 80 of 300
epochs in the paper → `ramp_fraction` = 0.27 of the steps) and w_max = 100 · M/N (M labeled of N
images). Sigmoid outputs replace the paper's softmax (the classes are not exclusive).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from cxrdistill.config import RunConfig
from cxrdistill.data.study import StudyData
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.optim import build_optimizer, ramp_up
from cxrdistill.errors import ConfigError
from cxrdistill.eval.runs import evaluate_classifier
from cxrdistill.methods.registry import register_method
from cxrdistill.methods.kit import (
    Augment,
    augment_batch,
    build_classifier_model,
    evaluate_final,
    image_labeled,
    labeled_loader,
    step_generator,
    view_config,
)
from cxrdistill.models.classifier import masked_bce_with_logits


class ConsistencyParams(BaseModel):
    """Parameters shared by the Π-model and temporal ensembling (Laine & Aila): the ramped,
    M/N-scaled consistency weight, the augmentation, the splits."""

    model_config = ConfigDict(extra="forbid")

    w_max: float = Field(100.0, ge=0.0)
    """Maximum consistency weight before the M/N scaling (paper: 100 for Π, 30 for ensembling)."""
    scale_by_labeled_fraction: bool = True
    """Multiply w_max by M/N, as the paper does."""
    ramp_fraction: float = Field(80 / 300, ge=0.0, le=1.0)
    """Fraction of the steps over which w(t) ramps up (paper: 80 of 300 epochs)."""
    augment: Augment = "strong"
    """The stochastic augmentation (the paper: translations + flips; plus dropout)."""
    train_split: str = "train"
    eval_split: str = "test"
    n_boot: int = Field(1000, ge=0)

    def weight_schedule(self, n_labeled: int, n_unlabeled: int, max_steps: int) -> Callable[[int], float]:
        """w(step): ``w_max · M/N`` (M labeled of N images) times the Gaussian ramp-up."""
        w_max = self.w_max * (n_labeled / (n_labeled + n_unlabeled) if self.scale_by_labeled_fraction else 1.0)
        ramp = round(self.ramp_fraction * max_steps)
        return lambda step: w_max * ramp_up(step, ramp)


class PiModelParams(ConsistencyParams):
    """`method.params` of ``pi_model``; defaults are the paper's."""

    detach: bool = False
    """Stop the gradient through the second branch z̃. False (the paper, Algorithm 1): both branches
    are stochastic passes of the same network and the squared difference is back-propagated
    through both."""


def consistency_loss(probs: Tensor, targets: Tensor, mask: Tensor | None = None, detach: bool = True) -> Tensor:
    """Mean over images of ``‖probs − targets‖² / C``; ``mask (B,)`` keeps some images; ``detach``:
    no gradient through ``targets`` (temporal ensembling's targets are constants anyway)."""
    per_image = ((probs - (targets.detach() if detach else targets)) ** 2).mean(dim=1)
    if mask is None:
        return per_image.mean()
    m = mask.to(per_image)
    return (per_image * m).sum() / m.sum().clamp(min=1.0)


def semi_sets(data: StudyData, split: str) -> tuple[Any, list[int], list[int]]:
    """The training split, its image-labeled rows and its unlabeled rows (supervision "none")."""
    train = data.dataset(split)
    labeled = image_labeled(train)
    unlabeled = [i for i, im in enumerate(train.images) if im.supervision == "none"]
    if not unlabeled:
        raise ConfigError("no unlabeled training image (supervision 'none'); lower data.boxed_fraction/weak_fraction")
    return train, labeled, unlabeled


@register_method("pi_model", PiModelParams)
def run(cfg: RunConfig, params: PiModelParams, ctx: RunContext) -> dict[str, float]:
    """Supervised BCE + ramped Π-model consistency between two augmented passes."""
    data = StudyData.from_config(cfg.data)
    train, labeled, unlabeled = semi_sets(data, params.train_split)
    model = build_classifier_model(cfg.model, data.num_classes)
    t = cfg.train
    loader, sampler = labeled_loader(train, labeled, unlabeled, t.batch_size, t.unlabeled_batch_size or t.batch_size,
                                     t.seed, ctx)
    view = view_config(params.augment)
    weight_at = params.weight_schedule(len(labeled), len(unlabeled), t.max_steps)
    model.train()

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        x = batch["image"]
        first, _ = augment_batch(x, batch["boxes"], batch["labels"], view, step_generator(t.seed, step, 0))
        second, _ = augment_batch(x, batch["boxes"], batch["labels"], view, step_generator(t.seed, step, 1))
        logits = model(torch.cat([first, second]))
        z, z_tilde = logits.split(len(x))
        mask = batch["has_image_labels"].to(x.dtype)[:, None].expand_as(batch["image_labels"])
        weight = weight_at(step)
        return {"bce": masked_bce_with_logits(z, batch["image_labels"], mask),
                "consistency": weight * consistency_loss(torch.sigmoid(z), torch.sigmoid(z_tilde),
                                                         detach=params.detach),
                "log_w": torch.tensor(weight)}

    ctx.trainer("pi_model").fit(step_fn, {"model": model}, build_optimizer(model.parameters(), t), loader,
                                t.max_steps, sampler=sampler)
    held_out = data.dataset(params.eval_split)
    return evaluate_final(ctx, lambda: evaluate_classifier(model, held_out, ctx.run_dir.eval, split=params.eval_split,
                                                           n_boot=params.n_boot), "Π-model", model, data.class_names)


__all__ = ["ConsistencyParams", "PiModelParams", "consistency_loss", "ramp_up", "run", "semi_sets"]  # ramp_up: engine.optim
