"""Class-balanced top-κ selection of teacher pseudo-labels (Martins & Silva, Sec. III-B).

The paper keeps "only the best K = κ·N_u predictions on U ..., distributed for each class
proportionally to the class distribution seen on the labeled dataset" (κ = 0.75 was best).

Choices the paper leaves open, made here and tested:

- **Quota shortfall.** When a class has fewer candidates than its quota, all of them are kept and
  by default (``redistribute=False``, the paper's rule) no other class takes over the unused
  quota: each class keeps at most its labeled share of K, so fewer than K images are kept and the
  balance the paper guarantees holds (quotas 5:1 against candidates 2:6 keep 2:1).
  ``redistribute=True`` (the toolkit's earlier default) hands the unused quota to the classes
  that still have candidates, in proportion to their labeled shares, until K images are kept;
  then a teacher that under-predicts the minority class pushes its quota into the majority class
  (the same example keeps 2:4).
- **Rounding.** K = floor(κ·N + 0.5); per-class quotas by the largest-remainder method, so they
  sum to K exactly; equal remainders go to the lower class index.
- **Ties.** Within a class the most confident come first; equal confidences keep the lower image
  index first (stable sort). ``argmax`` ties go to the lower class index.
- A class with proportion 0 in the labeled set never receives pseudo-labels.
- **Multi-label** (the paper's future work, needed for multi-finding data): each class is the
  binary problem {negative, positive} of the single-label rule, with proportions
  (1 − prevalence, prevalence): per class, K = round(κ·N) entries are kept, the most confident
  positives (p > 0.5, highest p first) and negatives (lowest p first) in the labeled prevalence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class TopKappaSelection:
    """The kept pseudo-labels.

    Attributes:
        keep: single-label (N,) bool — image kept; multi-label (N, C) bool — entry kept.
        labels: (N, C) float: hard one-hot / multi-hot 0-1 labels, or the teacher's
            probabilities when soft. Rows / entries outside ``keep`` carry no supervision.
        counts: (C,) long, kept images per predicted class (single) or kept positives per
            class (multi): log these to see the pseudo-label balance.
    """

    keep: Tensor
    labels: Tensor
    counts: Tensor


def _largest_remainder(total: int, weights: Tensor) -> Tensor:
    """Split the integer ``total`` in proportion to ``weights`` (C,) float64; result sums to total."""
    exact = total * weights / weights.sum()
    base = exact.floor().long()
    left = total - int(base.sum())
    if left > 0:
        order = torch.argsort(exact - base, descending=True, stable=True)
        base[order[:left]] += 1
    return base


def apportion(total: int, weights: Tensor, capacity: Tensor, redistribute: bool = False) -> Tensor:
    """Per-class quotas (C,) long: ``total`` split in proportion to ``weights``, capped by ``capacity``.

    With ``redistribute``, quota a class cannot use goes to the classes that still have capacity
    (in proportion to their weights) until ``total`` is placed or every class is full.
    """
    weights = weights.double()
    quota = torch.zeros_like(capacity)
    remaining = total
    active = weights > 0
    while remaining > 0 and bool(active.any()):
        share = _largest_remainder(remaining, weights * active)
        give = torch.minimum(share, capacity - quota)
        quota += give
        remaining -= int(give.sum())
        if not redistribute:
            break
        active &= quota < capacity
    return quota


def _rank_within_class(pred: Tensor, conf: Tensor, num_classes: int) -> Tensor:
    """Rank (N,) of each item among the items of its class: 0 = most confident, ties by index."""
    by_conf = torch.argsort(conf, descending=True, stable=True)
    order = by_conf[torch.argsort(pred[by_conf], stable=True)]
    sizes = torch.bincount(pred, minlength=num_classes)
    starts = torch.cumsum(sizes, 0) - sizes  # first position of each class in ``order``
    rank = torch.empty_like(pred)
    rank[order] = torch.arange(pred.numel(), device=pred.device) - starts[pred[order]]
    return rank


def _select_single(probs: Tensor, kappa: float, proportions: Tensor, redistribute: bool) -> tuple[Tensor, Tensor]:
    """Keep mask (N,) and predicted class (N,) of the single-label rule."""
    n, c = probs.shape
    pred = probs.argmax(dim=1)
    conf = probs.gather(1, pred[:, None])[:, 0]
    total = math.floor(kappa * n + 0.5)
    quota = apportion(total, proportions.to(probs.device), torch.bincount(pred, minlength=c), redistribute)
    keep = _rank_within_class(pred, conf, c) < quota[pred]
    return keep, pred


def _check(probs: Tensor, kappa: float, proportions: Tensor, mode: str) -> None:
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {tuple(probs.shape)}")
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()) or bool((probs > 1).any()):
        bad = int((~torch.isfinite(probs) | (probs < 0) | (probs > 1)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"probs row {bad} is not a probability in [0, 1]: {probs[bad].tolist()}")
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"kappa is the fraction of images kept, in [0, 1]; got {kappa}")
    if tuple(proportions.shape) != (probs.shape[1],):
        raise ValueError(f"class_proportions must be ({probs.shape[1]},), got {tuple(proportions.shape)}")
    if not bool(torch.isfinite(proportions).all()) or bool((proportions < 0).any()):
        raise ValueError(f"class_proportions must be finite and non-negative, got {proportions.tolist()}")
    if mode == "single" and float(proportions.sum()) <= 0:
        raise ValueError("class_proportions sum to 0: the labeled set has no class to balance against")
    if mode == "multi" and bool((proportions > 1).any()):
        raise ValueError(f"multi-label class_proportions are prevalences in [0, 1], got {proportions.tolist()}")
    if mode not in ("single", "multi"):
        raise ValueError(f"mode must be 'single' or 'multi', got {mode!r}")


def class_balanced_top_kappa(
    probs: Tensor,
    kappa: float,
    class_proportions: Tensor,
    mode: Literal["single", "multi"] = "single",
    soft: bool = False,
    redistribute: bool = False,
) -> TopKappaSelection:
    """Select the κ most confident pseudo-labels, class-balanced like the labeled set.

    Args:
        probs: (N, C) teacher probabilities on the unlabeled images (softmax rows for
            ``"single"``, independent sigmoids for ``"multi"``).
        kappa: fraction of images kept, K = round(κ·N) (per class in ``"multi"``).
        class_proportions: (C,) labeled-set class frequencies (``"single"``: any non-negative
            weights, normalised here) or per-class prevalences in [0, 1] (``"multi"``).
        mode: ``"single"`` (one class per image: argmax) or ``"multi"`` (multi-hot).
        soft: return the teacher probabilities as labels instead of hard 0/1 labels.
        redistribute: hand unused quota of short classes to the others (default False, the paper's
            strict quotas; see module docstring).

    Returns:
        :class:`TopKappaSelection` with ``keep`` (N,) bool (single) or (N, C) bool (multi).
    """
    proportions = torch.as_tensor(class_proportions, dtype=torch.float64).cpu()
    _check(probs, kappa, proportions, mode)
    probs = probs.detach()
    n, c = probs.shape
    if mode == "single":
        keep, pred = _select_single(probs, kappa, proportions, redistribute)
        hard = torch.nn.functional.one_hot(pred, c).to(probs.dtype)
        counts = torch.bincount(pred[keep], minlength=c)
    else:
        keep = torch.zeros(n, c, dtype=torch.bool, device=probs.device)
        hard = torch.zeros_like(probs)
        for k in range(c):  # each class is its own binary {negative, positive} selection
            binary = torch.stack([1 - probs[:, k], probs[:, k]], dim=1)
            weights = torch.stack([1 - proportions[k], proportions[k]])
            keep[:, k], pred = _select_single(binary, kappa, weights, redistribute)
            hard[:, k] = pred.to(probs.dtype)
        counts = (keep & (hard > 0)).sum(dim=0)
    return TopKappaSelection(keep=keep, labels=probs.clone() if soft else hard, counts=counts)
