"""Temporal ensembling (Laine & Aila, ICLR 2017, Sec. 2.2) for multi-label classification.

Each training image keeps an exponential moving average ``Z_i`` of the network's predictions over
the times it was seen; the startup-corrected ensemble ``z̃_i = Z_i / (1 − α^{t_i})`` (t_i: times
seen) is the target of the current prediction:

    L = BCE(z_labeled, y) + w(t) · mean ‖σ(z) − z̃‖² / C,     then  Z_i ← α Z_i + (1 − α) σ(z_i)

α = 0.6, w_max = 30 · M/N and the Gaussian ramp-up of the Π-model (paper values). The paper
updates Z once per epoch; here each image's Z is updated every time the image is drawn (the
endless sampler has no epoch boundary), which is the same average at the image's own clock. An
image seen for the first time has no target yet. The ensemble is checkpointed with the run.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from cxrdistill.config import RunConfig
from cxrdistill.data.study import StudyData
from cxrdistill.data.views import random_view
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.eval.runs import evaluate_classifier
from cxrdistill.methods.consistency import ConsistencyParams, consistency_loss, consistency_setup, step_losses
from cxrdistill.methods.kit import (
    build_classifier_model,
    evaluate_final,
    step_generator,
)
from cxrdistill.methods.registry import register_method


class TemporalEnsemblingParams(ConsistencyParams):
    """`method.params` of ``temporal_ensembling``; defaults are the paper's."""

    alpha: float = Field(0.6, ge=0.0, lt=1.0)
    """Ensemble momentum α (paper: 0.6)."""
    w_max: float = Field(30.0, ge=0.0)
    """Maximum consistency weight before the M/N scaling (paper: 30)."""


class EnsembleTargets:
    """Per-image prediction ensemble ``Z (N, C)`` and visit counts ``t (N,)``, keyed by image id."""

    def __init__(self, image_ids: list[int], num_classes: int, alpha: float) -> None:
        self.row = {int(i): r for r, i in enumerate(image_ids)}
        self.alpha = alpha
        self.Z = torch.zeros(len(image_ids), num_classes)
        self.seen = torch.zeros(len(image_ids), dtype=torch.long)

    def _rows(self, image_ids: Tensor) -> Tensor:
        return torch.tensor([self.row[int(i)] for i in image_ids.tolist()], dtype=torch.long)

    def targets(self, image_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(z̃ (B, C), has_target (B,) bool)``: the startup-corrected ensemble of each image."""
        rows = self._rows(image_ids)
        seen = self.seen[rows]
        correction = (1 - self.alpha ** seen.double()).clamp(min=1e-12).float()[:, None]
        return self.Z[rows] / correction, seen > 0

    def update(self, image_ids: Tensor, probs: Tensor) -> None:
        """``Z ← α Z + (1 − α) probs`` for these images (a repeated id is updated once per occurrence)."""
        for row, p in zip(self._rows(image_ids).tolist(), probs.detach().float().cpu()):
            self.Z[row] = self.alpha * self.Z[row] + (1 - self.alpha) * p
            self.seen[row] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"Z": self.Z.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["Z"].shape != self.Z.shape:
            raise ValueError(f"ensemble of shape {tuple(state['Z'].shape)} does not match {tuple(self.Z.shape)}")
        self.Z, self.seen = state["Z"].clone(), state["seen"].clone()


@register_method("temporal_ensembling", TemporalEnsemblingParams)
def run(cfg: RunConfig, params: TemporalEnsemblingParams, ctx: RunContext) -> dict[str, float]:
    """Supervised BCE + ramped consistency with each image's temporal ensemble."""
    data = StudyData.from_config(cfg.data)
    model = build_classifier_model(cfg.model, data.num_classes)
    sets, loader, sampler, view, weight_at = consistency_setup(ctx, data, params)
    ensemble = EnsembleTargets([im.id for im in sets.dataset.images], data.num_classes, params.alpha)
    t = cfg.train
    model.train()

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        x, ids = batch["image"], batch["image_id"].cpu()
        images = random_view(x, view, step_generator(t.seed, step)).images
        z = model(images)
        probs = torch.sigmoid(z)
        target, has = ensemble.targets(ids)
        losses = step_losses(z, batch, consistency_loss(probs, target.to(probs), has.to(probs.device)),
                             weight_at(step))
        ensemble.update(ids, probs)
        return losses

    ctx.trainer("temporal_ensembling").fit(step_fn, {"model": model}, build_optimizer(model.parameters(), t), loader,
                                           t.max_steps, sampler=sampler, extra_state={"ensemble": ensemble})
    held_out = data.dataset(params.eval_split)
    return evaluate_final(ctx, lambda: evaluate_classifier(model, held_out, ctx.run_dir.eval, split=params.eval_split,
                                                           n_boot=params.n_boot), "temporal ensembling", model, data.class_names)


__all__ = ["EnsembleTargets", "TemporalEnsemblingParams", "run"]
