"""Adaptive asymmetric label sharpening (AALS) and its KL distillation loss (Wang et al., Sec. 2).

Eq. (6): S(y') = expit(a·logit(y') + (1 − a)·logit(t)), with t < 0.5 the sharpening centre
(t = 0.4 in the paper): probabilities above t are pushed up, below t pushed down, and with t < 0.5
low probabilities are lifted more than high ones are cut (asymmetric).
Eq. (7): a = a0 − (a0 − 1)·y'_max, y'_max the maximum of the teacher's map: a → 1 (identity)
when the teacher is confident somewhere, a → a0 (strongest) when it finds nothing (a0 = 4 best,
a0 = 1 is no sharpening).
The final target is max(S(y'), y') ("to avoid over penalization of the student model's activation
on fracture sites with low probability values in y'").
Eq. (4): L_semi = Σ_{x∈P} KLDiv(S(f_teacher(x)), f_student(x)), the KL divergence from the
sharpened target to the student's per-pixel Bernoulli prediction.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def sharpening_curve(y: Tensor, a: Tensor | float, t: float = 0.4, eps: float = 1e-6) -> Tensor:
    """AALS Eq. (6): S(y) = expit(a·logit(y) + (1 − a)·logit(t)); S(t) = t, a = 1 is the identity.

    ``y`` is clamped to [eps, 1 − eps] inside the logit; ``a`` broadcasts against ``y``.
    """
    logit_t = torch.logit(torch.tensor(t, dtype=y.dtype, device=y.device))
    return torch.sigmoid(a * torch.logit(y.clamp(eps, 1 - eps)) + (1 - a) * logit_t)


def asymmetric_sharpen(y: Tensor, t: float = 0.4, a0: float = 4.0, eps: float = 1e-6) -> Tensor:
    """AALS target max(S(y), y) of AALS Eqs. (6)–(7), computed per image and class.

    Args:
        y: (B, C, H, W) teacher probability maps in [0, 1] (any (B, C, *spatial) works).
        t: sharpening centre, 0 < t < 1.
        a0: largest sharpening strength (a0 >= 1; 1 = identity).
        eps: y is clamped to [eps, 1 − eps] inside the logit.

    Returns:
        Target of y's shape, detached (the teacher is a constant), >= y everywhere.
    """
    if y.ndim < 3:
        raise ValueError(f"y must be (B, C, *spatial) probability maps, got shape {tuple(y.shape)}")
    if not 0.0 < t < 1.0:
        raise ValueError(f"sharpening centre t must be in (0, 1), got {t}")
    if a0 < 1.0:
        raise ValueError(f"a0 must be >= 1 (1 = no sharpening), got {a0}")
    y = y.detach()
    y_max = y.flatten(2).amax(dim=2).view(*y.shape[:2], *([1] * (y.ndim - 2)))
    a = a0 - (a0 - 1.0) * y_max  # Eq. (7)
    return torch.maximum(sharpening_curve(y, a, t, eps), y)


def bernoulli_kl_with_logits(student_logits: Tensor, target: Tensor) -> Tensor:
    """Element-wise KL(target ‖ sigmoid(student_logits)) of Bernoulli variables, stable from logits.

    KL = t·log(t/q) + (1 − t)·log((1 − t)/(1 − q)) = BCE(q, t) − H(t); 0 where q = t.
    """
    entropy = -(torch.xlogy(target, target) + torch.xlogy(1 - target, 1 - target))
    return F.binary_cross_entropy_with_logits(student_logits, target, reduction="none") - entropy


def kl_map_loss(
    student_logits: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """AALS Eq. (4): KL divergence from the sharpened target to the student's per-pixel prediction.

    Args:
        student_logits: (B, C, H, W) student logits.
        target: (B, C, H, W) target in [0, 1], e.g. :func:`asymmetric_sharpen` of the teacher map.
        mask: which maps count — bool/float broadcastable to (B, C, H, W), e.g. (B, 1, 1, 1) for
            the image-level positive images P or (B, C, 1, 1) per class; None = all.
        reduction: ``"mean"`` over the counted pixels (same scale as a mean pixel BCE), or
            ``"sum"`` as written in Eq. (4).

    Returns:
        Scalar loss; 0 (still differentiable) when the mask selects nothing.
    """
    if student_logits.shape != target.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and target {tuple(target.shape)} differ")
    kl = bernoulli_kl_with_logits(student_logits, target.detach().to(student_logits.dtype))
    weight = torch.ones_like(kl) if mask is None else mask.to(kl.dtype).expand_as(kl)
    total = (kl * weight).sum()
    if reduction == "sum":
        return total
    return total / weight.sum().clamp(min=1.0)
