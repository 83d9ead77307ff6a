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

from typing import Any

import torch
from torch import Tensor

from cxrdistill.config import RunConfig
from cxrdistill.data.study import StudyData
from cxrdistill.data.views import random_view
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.optim import build_optimizer, ramp_up
from cxrdistill.eval.runs import evaluate_classifier
from cxrdistill.methods.consistency import (
    ConsistencyParams,
    consistency_loss,
    consistency_setup,
    semi_sets,
    step_losses,
)
from cxrdistill.methods.kit import (
    build_classifier_model,
    evaluate_final,
    step_generator,
)
from cxrdistill.methods.registry import register_method


class PiModelParams(ConsistencyParams):
    """`method.params` of ``pi_model``; defaults are the paper's."""

    detach: bool = False
    """Stop the gradient through the second branch z̃. False (the paper, Algorithm 1): both branches
    are stochastic passes of the same network and the squared difference is back-propagated
    through both."""


@register_method("pi_model", PiModelParams)
def run(cfg: RunConfig, params: PiModelParams, ctx: RunContext) -> dict[str, float]:
    """Supervised BCE + ramped Π-model consistency between two augmented passes."""
    data = StudyData.from_config(cfg.data)
    model = build_classifier_model(cfg.model, data.num_classes)
    t = cfg.train
    _, loader, sampler, view, weight_at = consistency_setup(ctx, data, params)
    model.train()

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        x = batch["image"]
        first = random_view(x, view, step_generator(t.seed, step, 0)).images
        second = random_view(x, view, step_generator(t.seed, step, 1)).images
        logits = model(torch.cat([first, second]))
        z, z_tilde = logits.split(len(x))
        consistency = consistency_loss(torch.sigmoid(z), torch.sigmoid(z_tilde), detach=params.detach)
        return step_losses(z, batch, consistency, weight_at(step))

    ctx.trainer("pi_model").fit(step_fn, {"model": model}, build_optimizer(model.parameters(), t), loader,
                                t.max_steps, sampler=sampler)
    held_out = data.dataset(params.eval_split)
    return evaluate_final(ctx, lambda: evaluate_classifier(model, held_out, ctx.run_dir.eval, split=params.eval_split,
                                                           n_boot=params.n_boot), "Π-model", model, data.class_names)


__all__ = ["ConsistencyParams", "PiModelParams", "consistency_loss", "ramp_up", "run", "semi_sets"]  # ramp_up: engine.optim
