"""What the Π-model and temporal ensembling (Laine & Aila, ICLR 2017) share: the ramped, M/N-scaled
consistency weight, the squared-difference consistency cost and the labeled / unlabeled split of
the training images. Both recipe files compose these; neither imports the other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.utils.data import DataLoader

from cxrdistill.data.study import StudyData
from cxrdistill.data.views import ViewConfig
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.optim import ramp_up
from cxrdistill.engine.sampler import RatioBatchSampler
from cxrdistill.errors import ConfigError
from cxrdistill.methods.kit import Augment, TrainSets, image_labeled, semi_loader, semi_losses, view_config
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


def consistency_loss(probs: Tensor, targets: Tensor, mask: Tensor | None = None, detach: bool = True) -> Tensor:
    """Mean over images of ``‖probs − targets‖² / C``; ``mask (B,)`` keeps some images; ``detach``:
    no gradient through ``targets`` (temporal ensembling's targets are constants anyway)."""
    per_image = ((probs - (targets.detach() if detach else targets)) ** 2).mean(dim=1)
    if mask is None:
        return per_image.mean()
    m = mask.to(per_image)
    return (per_image * m).sum() / m.sum().clamp(min=1.0)


def step_losses(logits: Tensor, batch: dict[str, Any], consistency: Tensor, weight: float) -> dict[str, Tensor]:
    """A step's L = BCE(z_labeled, y) + w(t) · consistency: ``sup/bce`` (masked to the images with
    image labels), ``unsup/consistency`` (times ``weight``) and ``log_w``."""
    mask = batch["has_image_labels"].to(batch["image"].dtype)[:, None].expand_as(batch["image_labels"])
    return {**semi_losses({"bce": masked_bce_with_logits(logits, batch["image_labels"], mask)},
                          {"consistency": consistency}, weight), "log_w": torch.tensor(weight)}


def semi_sets(data: StudyData, split: str) -> TrainSets:
    """The training split with its image-labeled rows and its unlabeled rows (supervision "none")."""
    train = data.dataset(split)
    labeled = image_labeled(train)
    unlabeled = [i for i, im in enumerate(train.images) if im.supervision == "none"]
    if not unlabeled:
        raise ConfigError("no unlabeled training image (supervision 'none'); lower data.boxed_fraction/weak_fraction")
    return TrainSets(train, labeled, unlabeled)


def consistency_setup(ctx: RunContext, data: StudyData, params: ConsistencyParams
                      ) -> tuple[TrainSets, DataLoader[dict[str, Any]], RatioBatchSampler, ViewConfig, Callable[[int], float]]:
    """What both recipes train with: their sets, the labeled/unlabeled loader (seed ``train.seed``), the
    stochastic view and the consistency weight w(step)."""
    sets = semi_sets(data, params.train_split)
    loader, sampler = semi_loader(ctx, sets, ctx.cfg.train.seed)
    weight_at = params.weight_schedule(len(sets.labeled), len(sets.unlabeled), ctx.cfg.train.max_steps)
    return sets, loader, sampler, view_config(params.augment), weight_at


__all__ = ["ConsistencyParams", "consistency_loss", "consistency_setup", "semi_sets", "step_losses"]
