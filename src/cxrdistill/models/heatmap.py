"""Per-class probability maps (AALS): an FPN over a ResNet, fused at one stride.

Pixel ``(i, j)`` of a map at stride ``s`` covers image pixels ``[j*s, (j+1)*s) x [i*s, (i+1)*s)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
from scipy import ndimage
from torch import Tensor, nn

from cxrdistill.models.backbones import build_backbone, conv_stack, init_normal, prior_bias

OUTPUT_STRIDES = (4, 8, 16, 32)


class HeatmapFPN(nn.Module):
    """ResNet-FPN whose pyramid levels are upsampled to ``output_stride`` and summed, then a small
    head predicts one logit map per class.

    Args:
        num_classes: ``C``.
        depth, in_channels, base_width: backbone settings (see :func:`~cxrdistill.models.backbones.build_backbone`).
        backbone: a registered backbone name; None: ``resnet{depth}``.
        freeze_bn: keep the backbone's BatchNorm frozen.
        fpn_channels: FPN width.
        output_stride: 4, 8, 16 or 32.
        head_convs: 3x3 conv layers before the 1x1 classifier.
        prior: initial foreground probability of every pixel.

    ``forward(images (B, 1, H, W)) -> logits (B, C, ceil(H/s), ceil(W/s))``.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 18,
        in_channels: int = 1,
        base_width: int = 64,
        freeze_bn: bool = False,
        fpn_channels: int = 128,
        output_stride: int = 4,
        head_convs: int = 1,
        prior: float = 0.01,
        backbone: str | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.backbone = build_backbone(backbone or f"resnet{depth}", in_channels, base_width, freeze_bn=freeze_bn)
        self._first = OUTPUT_STRIDES.index(output_stride)  # index of the first backbone map used
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=2, in_channels_list=self.backbone.out_channels[self._first :], out_channels=fpn_channels
        )
        self.tower = conv_stack(fpn_channels, head_convs)
        self.classifier = nn.Conv2d(fpn_channels, num_classes, 1)
        init_normal([self.tower, self.classifier])
        nn.init.constant_(self.classifier.bias, prior_bias(prior))

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 1, H, W)`` in [0, 1] -> logits ``(B, C, h, w)`` at ``output_stride``."""
        feats = self.backbone(images)[self._first :]
        levels = list(self.fpn(OrderedDict((f"p{i}", f) for i, f in enumerate(feats))).values())
        size = levels[0].shape[-2:]
        fused = levels[0]
        for level in levels[1:]:
            fused = fused + F.interpolate(level, size=size, mode="bilinear", align_corners=False)
        return self.classifier(self.tower(fused))


def boxes_to_masks(
    boxes_list: Sequence[Tensor],
    labels_list: Sequence[Tensor],
    num_classes: int,
    height: int,
    width: int,
    stride: int,
    scores_list: Sequence[Tensor] | None = None,
) -> Tensor:
    """Rasterise boxes into per-class masks at ``stride`` (AALS's ground-truth maps).

    A map pixel is inside a box when its centre ``((j + 0.5) * s, (i + 0.5) * s)`` lies in the
    box; the pixel holding the box centre is always set, so tiny boxes are never lost.

    Args:
        boxes_list: per image ``(N, 4)`` xyxy in pixels of the ``height x width`` image.
        labels_list: per image ``(N,)`` class indices.
        num_classes: ``C``.
        height, width: image size in pixels.
        stride: map stride (the model's ``output_stride``).
        scores_list: optional per image ``(N,)`` values to write instead of 1 (max where boxes overlap).

    Returns:
        ``(B, C, ceil(height / stride), ceil(width / stride))`` float masks.
    """
    h, w = math.ceil(height / stride), math.ceil(width / stride)
    device = boxes_list[0].device if len(boxes_list) else torch.device("cpu")
    masks = torch.zeros(len(boxes_list), num_classes, h * w, device=device)
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    for b, (boxes, labels) in enumerate(zip(boxes_list, labels_list)):
        if boxes.numel() == 0:
            continue
        boxes = boxes.to(device=device, dtype=torch.float32)
        labels = labels.to(device=device, dtype=torch.long)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"image {b}: labels must lie in [0, {num_classes}), got {labels.tolist()}")
        in_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] <= boxes[:, 3:4])  # (N, h)
        in_x = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] <= boxes[:, 2:3])  # (N, w)
        inside = in_y[:, :, None] & in_x[:, None, :]  # (N, h, w)
        cy = (((boxes[:, 1] + boxes[:, 3]) / 2) // stride).long().clamp(0, h - 1)
        cx = (((boxes[:, 0] + boxes[:, 2]) / 2) // stride).long().clamp(0, w - 1)
        inside[torch.arange(len(boxes), device=device), cy, cx] = True
        value = torch.ones(len(boxes), device=device) if scores_list is None else scores_list[b].to(device).float()
        values = inside.flatten(1).float() * value[:, None]  # (N, h*w)
        masks[b].scatter_reduce_(0, labels[:, None].expand_as(values), values, "amax")
    return masks.view(len(boxes_list), num_classes, h, w)


def pixel_bce_loss(logits: Tensor, masks: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted mean pixel-wise BCE between ``logits (B, C, h, w)`` and ``masks`` (same shape, [0, 1]).

    ``weights`` broadcasts to the logits: ``(B,)`` per image, ``(B, C)`` per image and class, or
    ``(B, C, h, w)`` per pixel; the result is ``sum(w * bce) / sum(w)`` (0 when all weights are 0).
    """
    if masks.shape != logits.shape:
        raise ValueError(f"masks {tuple(masks.shape)} must match logits {tuple(logits.shape)}")
    bce = F.binary_cross_entropy_with_logits(logits, masks.to(logits.dtype), reduction="none")
    if weights is None:
        return bce.mean()
    weights = weights.to(logits)
    while weights.ndim < logits.ndim:
        weights = weights.unsqueeze(-1)
    weights = weights.expand_as(logits)
    return (bce * weights).sum() / weights.sum().clamp(min=1e-12)


def image_scores(logits: Tensor) -> Tensor:
    """``(B, C, h, w)`` logits -> ``(B, C)`` image scores: the maximum probability of each map."""
    return torch.sigmoid(logits.flatten(2).amax(dim=2))


def maps_to_detections(probs: Tensor, threshold: float, stride: int) -> list[dict[str, Tensor]]:
    """Connected regions of ``probs (B, C, h, w) > threshold`` -> boxes.

    Each 8-connected region of a class map becomes one box covering its pixels (in image pixels,
    ``[x_min * s, y_min * s, (x_max + 1) * s, (y_max + 1) * s]``), scored by the maximum probability
    inside it. Returns per image ``{"boxes": (K, 4), "scores": (K,), "labels": (K,)}``, sorted by
    decreasing score. Runs on the CPU (scipy.ndimage).
    """
    array = probs.detach().float().cpu().numpy()
    structure = np.ones((3, 3), dtype=bool)
    results = []
    for per_image in array:
        boxes, scores, labels = [], [], []
        for cls, prob in enumerate(per_image):
            regions, count = ndimage.label(prob > threshold, structure=structure)
            if count == 0:
                continue
            slices = ndimage.find_objects(regions)
            peaks = ndimage.maximum(prob, labels=regions, index=np.arange(1, count + 1))
            for (sy, sx), peak in zip(slices, np.atleast_1d(peaks)):
                boxes.append([sx.start * stride, sy.start * stride, sx.stop * stride, sy.stop * stride])
                scores.append(float(peak))
                labels.append(cls)
        order = torch.as_tensor(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"), dtype=torch.long)
        results.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)[order],
                "scores": torch.tensor(scores, dtype=torch.float32)[order],
                "labels": torch.tensor(labels, dtype=torch.long)[order],
            }
        )
    return results
