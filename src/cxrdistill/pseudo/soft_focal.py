"""Soft focal loss for distilling a teacher's anchor probabilities (OXnet, Sec. 2.3, Eq. 8).

L_SFL(q, q̃) = (q̃·α + ε) · |q̃ − q|^γ · BCE(q, q̃)

with q the student's and q̃ the teacher's per-anchor, per-class probability. Eq. (8) as printed
carries a leading minus sign, which would make the loss negative because BCE(q, q̃) already
includes the minus of the log-likelihood; the loss here is the positive form. The weight
q̃α + ε replaces focal loss's α / (1 − α) (OXnet: α = 0.9, ε = 0.05, γ = 2, after FocalMix), and
|q̃ − q|^γ replaces (1 − q)^γ, so the loss is exactly 0 where the student agrees with the teacher.
For a hard target q̃ = 1 it is (α + ε)(1 − q)^γ·(−log q), the focal loss of Eq. (7) with weight
α + ε; for q̃ = 0 it is ε·q^γ·(−log(1 − q)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_focal_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    alpha: float = 0.9,
    eps: float = 0.05,
    gamma: float = 2.0,
    normaliser: Tensor | float = 1.0,
) -> Tensor:
    """Sum of OXnet Eq. (8) over anchors and classes, divided by max(normaliser, 1).

    Args:
        student_logits: (B, A, C) classification logits of the student (any equal shapes work).
        teacher_probs: (B, A, C) teacher probabilities in [0, 1], treated as constants.
        alpha, eps, gamma: Eq. (8) constants (paper: 0.9, 0.05, 2).
        normaliser: divisor, e.g. the number of anchors the teacher calls foreground
            (RetinaNet normalises by positive anchors); clamped to at least 1.

    Returns:
        Scalar loss, computed from logits (BCE with logits) for numerical stability.
    """
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_probs {tuple(teacher_probs.shape)} differ"
        )
    target = teacher_probs.detach().to(student_logits.dtype)
    q = torch.sigmoid(student_logits)
    bce = F.binary_cross_entropy_with_logits(student_logits, target, reduction="none")
    loss = (target * alpha + eps) * (target - q).abs().pow(gamma) * bce
    norm = torch.as_tensor(normaliser, dtype=loss.dtype, device=loss.device).clamp(min=1.0)
    return loss.sum() / norm
