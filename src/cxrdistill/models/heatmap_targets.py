"""Per-(image, class) supervision of heat-map networks: the R / N / P sets of AALS (Wang et al., 2021).

R: images with boxes (supervision "box"; every class has a box mask). N: the absent classes of
image-level images (supervision "image"; an all-zero map). P: the present classes of used
image-level images (no mask; AALS's pseudo maps). The supervised heat-map stage
(`methods.kit.supervised_stage(kind="heatmap")`) trains on R ∪ N with :func:`supervised_map_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cxrdistill.models.heatmap import boxes_to_masks, pixel_bce_loss

if TYPE_CHECKING:
    from cxrdistill.data.dataset import CXRDataset
    from cxrdistill.data.views import View


@dataclass
class MapTargets:
    """Per-(image, class) supervision of a batch at the map resolution.

    masks ``(B, C, h, w)``: box masks for R, zeros otherwise. ``supervised (B, C)``: 1 where L_sup
    applies (every class of R, the absent classes of N images). ``positive (B, C)``: 1 where L_semi
    applies (the present classes of the used P images).
    """

    masks: Tensor
    supervised: Tensor
    positive: Tensor


def map_targets(batch: dict[str, Any], num_classes: int, stride: int, positive_ids: Tensor,
                view: View | None = None) -> MapTargets:
    """The R / N / P supervision of a collated batch (see :class:`MapTargets`); the box masks are
    rasterised from the boxes as projected into ``view`` (None: the batch's own boxes)."""
    images = batch["image"]
    height, width = images.shape[-2:]
    boxes, labels = (batch["boxes"], batch["labels"]) if view is None else (view.boxes, view.labels)
    masks = boxes_to_masks(boxes, labels, num_classes, height, width, stride)
    has_boxes = batch["has_boxes"].to(images.device)
    weak = batch["has_image_labels"].to(images.device) & ~has_boxes
    present = batch["image_labels"].to(images)
    boxed = has_boxes[:, None].float().expand_as(present)
    supervised = boxed + weak[:, None].float() * (1 - present)
    used = torch.isin(batch["image_id"].to(images.device), positive_ids.to(images.device))
    positive = (weak & used)[:, None].float() * present
    return MapTargets(masks.to(images), supervised, positive)


def supervised_map_loss(logits: Tensor, targets: MapTargets) -> Tensor:
    """L_sup (Eq. 1): mean pixel BCE over the supervised maps of R ∪ N."""
    return pixel_bce_loss(logits, targets.masks, weights=targets.supervised)


def map_supervised_indices(dataset: CXRDataset) -> list[int]:
    """Indices of R ∪ N: the box images and the image-level images with at least one absent class."""
    out = []
    for index, im in enumerate(dataset.images):
        if im.supervision == "box" or (im.supervision == "image" and not dataset.manifest.image_labels(im.id).all()):
            out.append(index)
    return out


__all__ = ["MapTargets", "map_supervised_indices", "map_targets", "supervised_map_loss"]
