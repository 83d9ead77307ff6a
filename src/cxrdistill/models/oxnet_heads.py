"""OXnet's global branch over a RetinaNet (Luo et al., MICCAI 2021, Secs. 2.1-2.2).

Shapes: ``B`` images, ``N`` classes, ``Cm`` channels of the last backbone map ``M``
(``DetectorOutput.backbone_feature``, ``(B, Cm, h, w)``), ``L`` pyramid levels.

* :func:`local_attention` -- the local attention ``A (B, N, h, w)`` of Eq. (2): the RetinaNet
  classification probabilities, max over the ``K`` anchors of a location, one level per (image,
  class) -- the level whose peak is highest (Eq. 2's argmax; the public code does the same) --
  resized to ``M``'s grid. ``level_reduce="max"`` takes the element-wise maximum of all resized
  levels instead.
* :func:`attention_weights` -- ``R_c = A_c / sum_i A_c`` (Eq. 3): sums to one over pixels.
* :func:`daa_logits` -- DAA pooling ``sum_i X_c * R_c`` (Eq. 3, before the sigmoid);
  :func:`gap_logits` -- the plain global head (global average pooling, Fig. 2 (2)).
* :func:`class_features` -- ``F_c = sum_i M * R_c`` (Eq. 4), ``(B, N, Cm)``.
* :class:`GlobalPrototypes` -- GPA's prototypes (Eq. 5) as buffers (checkpointed with the module)
  and the intra-class / inter-class losses (Eq. 6).
* :class:`GlobalBranch` -- the 1x1 convolution ``M -> X`` plus all of the above.

Nothing here is detached: the gradient of the global losses reaches the local classification
head through ``R`` (the point of DAA). Only the prototype update uses detached features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cxrdistill.models.detector import DetectorOutput

LevelReduce = Literal["select", "max"]
Pooling = Literal["daa", "gap"]
Distance = Literal["mean", "sum"]


def local_attention(out: DetectorOutput, size: tuple[int, int], level_reduce: LevelReduce = "select") -> Tensor:
    """Local attention ``A (B, N, size)`` from the per-anchor classification logits (Eq. 2).

    Per level: sigmoid probabilities, max over the ``K`` anchors of each location. ``"select"``
    keeps, per image and class, the level whose maximum is largest (Eq. 2); ``"max"`` takes the
    element-wise maximum over levels. Levels are resized to ``size`` bilinearly (antialiased when
    shrinking, so a fine level is averaged rather than sub-sampled).
    """
    if level_reduce not in ("select", "max"):
        raise ValueError(f"level_reduce must be 'select' or 'max', got {level_reduce!r}")
    probs = torch.sigmoid(out.cls_logits.float())  # (B, A, N)
    resized, peaks = [], []
    for level in out.level_views(probs):  # (B, h_l, w_l, K, N)
        per_location = level.amax(dim=3).permute(0, 3, 1, 2)  # (B, N, h_l, w_l)
        peaks.append(per_location.flatten(2).amax(dim=2))  # (B, N)
        resized.append(F.interpolate(per_location, size=size, mode="bilinear", align_corners=False,
                                     antialias=True))
    stacked = torch.stack(resized)  # (L, B, N, h, w)
    if level_reduce == "max":
        return stacked.amax(dim=0)
    best = torch.stack(peaks).argmax(dim=0)  # (B, N)
    index = best[None, :, :, None, None].expand(1, *stacked.shape[1:])
    return stacked.gather(0, index).squeeze(0)


def attention_weights(attention: Tensor, eps: float = 1e-12) -> Tensor:
    """``R = A / sum_pixels A`` for ``attention (B, N, h, w) >= 0``; each ``R[b, c]`` sums to one."""
    total = attention.flatten(2).sum(dim=2).clamp(min=eps)
    return attention / total[:, :, None, None]


def daa_logits(class_maps: Tensor, weights: Tensor) -> Tensor:
    """DAA pooling (Eq. 3): ``sum_i X_c * R_c`` for ``class_maps``, ``weights (B, N, h, w)`` -> ``(B, N)``."""
    return (class_maps * weights).flatten(2).sum(dim=2)


def gap_logits(class_maps: Tensor) -> Tensor:
    """The plain global head: global average pooling of ``class_maps (B, N, h, w)`` -> ``(B, N)``."""
    return class_maps.flatten(2).mean(dim=2)


def class_features(feature: Tensor, weights: Tensor) -> Tensor:
    """Category-specific features (Eq. 4): ``F[b, c] = sum_i M[b, :, i] * R[b, c, i]``.

    ``feature (B, Cm, h, w)``, ``weights (B, N, h, w)`` -> ``(B, N, Cm)``.
    """
    return torch.einsum("bmhw,bnhw->bnm", feature, weights)


class GlobalPrototypes(nn.Module):
    """Global prototypes ``P (N, Cm)`` of GPA (Sec. 2.2) and the losses of Eq. (6).

    Eq. (5): ``P_{t+1} = beta * P_t + (1 - beta) * sum_k p_k F_k / sum_k p_k`` per class, with
    ``beta = 0`` at a class's first update and ``momentum`` (0.7) afterwards. ``P`` and the per-class
    ``initialised`` flags are buffers, so they are checkpointed and restored with the module.

    ``distance`` sets the scale of ``||F - P||^2`` in Eq. (6): ``"mean"`` (default) is the squared
    difference *averaged* over the ``Cm`` channels, as in the authors' code (LLYXC/OXnet,
    ``losses.py``, ``GlobalContrastiveLoss.distance``: ``torch.pow(f1 - f2, 2).mean()``), so the
    margin ``delta = 1`` means the same at any width (their C5 has 2048 channels, ours 64);
    ``"sum"`` is the paper-literal squared L2 norm summed over channels, where at our width no pair
    ever falls inside ``delta = 1`` and L_Inter is identically 0 (docs/fidelity.md).
    """

    def __init__(self, num_classes: int, channels: int, momentum: float = 0.7, margin: float = 1.0,
                 distance: Distance = "mean") -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"prototype momentum must be in [0, 1), got {momentum}")
        if distance not in ("mean", "sum"):
            raise ValueError(f"GPA distance must be 'mean' or 'sum', got {distance!r}")
        self.momentum = momentum
        self.margin = margin
        self.distance = distance
        self.register_buffer("prototypes", torch.zeros(num_classes, channels))
        self.register_buffer("initialised", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, features: Tensor, confidences: Tensor) -> None:
        """Eq. (5) with ``features (B, N, Cm)`` and confidence weights ``confidences (B, N) >= 0``.

        A class whose weights are all zero in this batch keeps its prototype. Under DDP the weighted
        sums are all-reduced first, so every process takes the mean over the global batch and the
        prototypes stay identical on all of them.
        """
        weights = confidences.detach().to(features.dtype)
        total = weights.sum(dim=0)  # (N,)
        weighted = torch.einsum("bn,bnm->nm", weights, features.detach())  # (N, Cm)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(weighted)
        seen = total > 0
        mean = weighted / total.clamp(min=1e-12)[:, None]
        beta = torch.where(self.initialised, self.momentum, 0.0).to(mean.dtype)[:, None]
        updated = beta * self.prototypes + (1.0 - beta) * mean
        self.prototypes.copy_(torch.where(seen[:, None], updated, self.prototypes))
        self.initialised |= seen

    def distances(self, features: Tensor) -> Tensor:
        """``d[b, j, c] = ||F[b, j] - P_c||^2`` on this module's scale (see ``distance``), ``(B, N, N)``."""
        squared = (features[:, :, None, :] - self.prototypes.detach()[None, None]).pow(2)  # (B, j, c, Cm)
        return squared.mean(dim=3) if self.distance == "mean" else squared.sum(dim=3)

    def intra_loss(self, features: Tensor, mask: Tensor) -> Tensor:
        """``||F_c - P_c||^2`` averaged over the (image, class) pairs where ``mask (B, N)`` holds
        and ``P_c`` exists (Eq. 6, L_Intra); 0 when there is none."""
        valid = mask.bool() & self.initialised[None, :]
        dist = self.distances(features).diagonal(dim1=1, dim2=2)  # (B, N)
        return _masked_mean(dist, valid)

    def _inter_pairs(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        num_classes = features.shape[1]
        off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=features.device)
        valid = mask.bool()[:, :, None] & self.initialised[None, None, :] & off_diagonal[None]
        return self.distances(features), valid

    def inter_loss(self, features: Tensor, mask: Tensor) -> Tensor:
        """``max(0, margin - ||F_j - P_c||^2)`` averaged over images, ``j`` with ``mask[b, j]``
        and initialised prototypes ``c != j`` (Eq. 6, L_Inter); 0 when there is none."""
        dist, valid = self._inter_pairs(features, mask)
        return _masked_mean((self.margin - dist).clamp(min=0), valid)

    @torch.no_grad()
    def inside_margin_fraction(self, features: Tensor, mask: Tensor) -> Tensor:
        """Fraction of L_Inter's (image, j, c != j) pairs with ``||F_j - P_c||^2 < margin`` (the
        pairs that give L_Inter a gradient); 0 when there is none."""
        dist, valid = self._inter_pairs(features.detach(), mask)
        return _masked_mean((dist < self.margin).to(dist.dtype), valid)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    count = mask.sum()
    return (values * mask).sum() / count.clamp(min=1)


@dataclass
class GlobalOutput:
    """What :class:`GlobalBranch` computes for a batch.

    logits: ``(B, N)`` image-level logits (``p = sigmoid(logits)``).
    class_maps: ``(B, N, h, w)`` the global attention ``X``.
    weights: ``(B, N, h, w)`` DAA weights ``R`` (None with GAP pooling).
    features: ``(B, N, Cm)`` class features ``F`` (None with GAP pooling).
    """

    logits: Tensor
    class_maps: Tensor
    weights: Tensor | None
    features: Tensor | None


class GlobalBranch(nn.Module):
    """OXnet's global classification head on the backbone map ``M`` (Sec. 2.1) with GPA (Sec. 2.2).

    Args:
        in_channels: ``Cm``, channels of ``DetectorOutput.backbone_feature``.
        num_classes: ``N``.
        pooling: ``"daa"`` (Eq. 3) or ``"gap"`` (the multi-task baseline's global head).
        level_reduce: how :func:`local_attention` combines pyramid levels.
        momentum, margin: GPA's ``beta`` after the first step (0.7) and ``delta`` (1).
        distance: the scale of GPA's distance (:class:`GlobalPrototypes`).

    The 1x1 convolution starts at zero weight (as in the public code), so the global loss does
    not disturb a pre-trained detector in the first steps.
    """

    def __init__(self, in_channels: int, num_classes: int, pooling: Pooling = "daa",
                 level_reduce: LevelReduce = "select", momentum: float = 0.7, margin: float = 1.0,
                 distance: Distance = "mean") -> None:
        super().__init__()
        if pooling not in ("daa", "gap"):
            raise ValueError(f"pooling must be 'daa' or 'gap', got {pooling!r}")
        self.pooling = pooling
        self.level_reduce = level_reduce
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.prototypes = GlobalPrototypes(num_classes, in_channels, momentum, margin, distance)

    def forward(self, out: DetectorOutput) -> GlobalOutput:
        """Image-level logits (and DAA weights and class features) for a detector's output."""
        feature = out.backbone_feature.float()
        class_maps = self.classifier(feature)  # X: (B, N, h, w)
        if self.pooling == "gap":
            return GlobalOutput(gap_logits(class_maps), class_maps, None, None)
        weights = attention_weights(local_attention(out, tuple(class_maps.shape[-2:]), self.level_reduce))
        return GlobalOutput(daa_logits(class_maps, weights), class_maps, weights, class_features(feature, weights))


__all__ = [
    "GlobalBranch", "GlobalOutput", "GlobalPrototypes", "attention_weights", "class_features",
    "daa_logits", "gap_logits", "local_attention",
]
