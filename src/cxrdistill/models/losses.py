"""Element-wise losses shared by the detector and heat-map models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss with soft targets, element-wise (no reduction).

    ``loss = alpha_t * |t - p|^gamma * BCE(p, t)`` with ``p = sigmoid(logits)`` and
    ``alpha_t = alpha * t + (1 - alpha) * (1 - t)``. For ``t`` in {0, 1} this is exactly the focal
    loss of Lin et al. (``|t - p| = 1 - p_t``); for soft ``t`` it is minimised at ``p = t``
    (the "quality focal loss" form). ``alpha < 0`` disables the class balancing.

    Args:
        logits: any shape.
        targets: same shape, values in [0, 1].
    """
    targets = targets.to(logits.dtype)
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = ce * (targets - prob).abs().pow(gamma)
    if alpha >= 0:
        loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
    return loss


def box_area(boxes: Tensor) -> Tensor:
    """``(..., 4)`` xyxy -> ``(...)`` area (0 for degenerate boxes)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def pairwise_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of every pair: ``(..., N, 4)`` x ``(..., M, 4)`` -> ``(..., N, M)``; batch dims broadcast."""
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return inter / union.clamp(min=eps)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """GIoU of aligned pairs: ``(..., 4)`` x ``(..., 4)`` -> ``(...)`` in [-1, 1]."""
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(boxes1) + box_area(boxes2) - inter
    iou = inter / union.clamp(min=eps)
    hull = (torch.maximum(boxes1[..., 2:], boxes2[..., 2:]) - torch.minimum(boxes1[..., :2], boxes2[..., :2])).prod(-1)
    return iou - (hull - union) / hull.clamp(min=eps)


def giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - GIoU`` of aligned xyxy pairs ``(..., 4)`` -> ``(...)``, in [0, 2]."""
    return 1.0 - generalized_box_iou(pred, target)
