"""RetinaNet-FPN for one-channel radiographs, built from MONAI's detection blocks (no torchvision).

Shapes: ``B`` images, ``A`` anchors per image (all levels), ``C`` classes, ``K`` anchors per
location. Boxes are xyxy in pixels of the input tensor (see docs/architecture.md).

* :meth:`RetinaNet.forward` -> :class:`DetectorOutput` (raw per-anchor logits and deltas, anchors,
  FPN features, last backbone map): what distillation losses need.
* :meth:`RetinaNet.loss` -> ``{"cls", "box"}`` (sigmoid focal loss with optional soft targets).
* :meth:`RetinaNet.decode` / :meth:`RetinaNet.predict` -> detections after batched per-class NMS.
* :func:`match_anchors` (IoU) and :func:`match_anchors_atss` assign anchors to boxes.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.apps.detection.utils.anchor_utils import AnchorGenerator
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7
from torch import Tensor, nn

from cxrdistill.engine.distributed import global_mean
from cxrdistill.models.backbones import build_backbone, conv_stack, init_normal, prior_bias
from cxrdistill.models.losses import giou_loss, pairwise_box_iou, sigmoid_focal_loss

BOX_LOSSES = ("smooth_l1", "giou")
CHECK_TARGETS_PER_IMAGE = os.environ.get("CXRDISTILL_CHECK_TARGETS", "") == "per_image"
"""Debug option: validate each image's targets separately (several host syncs per image) instead of
one combined check per batch; set ``CXRDISTILL_CHECK_TARGETS=per_image`` or assign this flag."""
MATCHERS = ("iou", "atss")


@dataclass
class DetectorOutput:
    """Raw head outputs of :class:`RetinaNet` for a batch.

    Attributes:
        cls_logits: ``(B, A, C)`` classification logits (sigmoid, one per class).
        box_deltas: ``(B, A, 4)`` box regression relative to ``anchors`` (MONAI ``BoxCoder``).
        anchors: ``(A, 4)`` xyxy pixels, shared by all images of the batch.
        level_sizes: ``[(h, w)]`` feature-map size per FPN level, finest first; anchor ``a`` of level
            ``l`` sits at flat index ``offset_l + (y * w + x) * K + k``.
        anchors_per_location: ``K``.
        fpn_features: ``[(B, F, h_l, w_l)]`` FPN maps, finest first.
        backbone_feature: ``(B, Cm, H/32, W/32)`` last backbone map (C5), for global heads.
        image_size: ``(H, W)`` of the input tensor.
    """

    cls_logits: Tensor
    box_deltas: Tensor
    anchors: Tensor
    level_sizes: list[tuple[int, int]]
    anchors_per_location: int
    fpn_features: list[Tensor]
    backbone_feature: Tensor
    image_size: tuple[int, int]

    @property
    def anchors_per_level(self) -> list[int]:
        """Number of anchors (locations x K) in each level."""
        return [h * w * self.anchors_per_location for h, w in self.level_sizes]

    def level_views(self, per_anchor: Tensor) -> list[Tensor]:
        """Split ``(B, A, X)`` into per-level views ``[(B, h_l, w_l, K, X)]``, finest first."""
        chunks = per_anchor.split(self.anchors_per_level, dim=1)
        return [
            chunk.reshape(chunk.shape[0], h, w, self.anchors_per_location, chunk.shape[-1])
            for chunk, (h, w) in zip(chunks, self.level_sizes)
        ]


class AnchorMatch(NamedTuple):
    """Anchor-to-box assignment for one image (``A`` anchors, ``N`` boxes)."""

    matched_idx: Tensor  # (A,) long: index of the assigned box, -1 where none
    positive: Tensor  # (A,) bool: trained towards its box's class and coordinates
    ignore: Tensor  # (A,) bool: left out of the classification loss


def match_anchors(
    anchors: Tensor,
    boxes: Tensor,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.4,
    allow_low_quality_matches: bool = True,
) -> AnchorMatch:
    """RetinaNet's IoU matching of ``anchors (A, 4)`` to ``boxes (N, 4)`` (xyxy).

    An anchor is positive for the box it overlaps most when that IoU is ``>= fg_iou_thresh``,
    negative below ``bg_iou_thresh`` and ignored in between. With ``allow_low_quality_matches``
    every box also claims the anchors of its highest (non-zero) IoU, so no box goes unmatched.
    With no boxes every anchor is negative.
    """
    num_anchors = anchors.shape[0]
    if boxes.numel() == 0:
        none = torch.zeros(num_anchors, dtype=torch.bool, device=anchors.device)
        return AnchorMatch(torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device), none, none)
    iou = pairwise_box_iou(boxes.to(anchors.dtype), anchors)  # (N, A)
    best_iou, best_box = iou.max(dim=0)
    positive = best_iou >= fg_iou_thresh
    if allow_low_quality_matches:
        best_per_box = iou.max(dim=1, keepdim=True).values  # (N, 1)
        claims = (iou == best_per_box) & (best_per_box > 0)  # (N, A)
        # an anchor claimed by several boxes goes to the one it overlaps most
        claimed_iou = torch.where(claims, iou, torch.full_like(iou, -1.0))
        claim_iou, claim_box = claimed_iou.max(dim=0)
        claimed = claim_iou >= 0
        best_box = torch.where(claimed & ~positive, claim_box, best_box)
        positive = positive | claimed
    ignore = ~positive & (best_iou >= bg_iou_thresh)
    matched = torch.where(positive, best_box, torch.full_like(best_box, -1))
    return AnchorMatch(matched, positive, ignore)


def match_anchors_atss(
    anchors: Tensor,
    boxes: Tensor,
    num_locations_per_level: Sequence[int],
    anchors_per_location: int,
    num_candidates: int = 4,
    center_in_gt: bool = False,
) -> AnchorMatch:
    """ATSS matching (Zhang et al. 2020) via MONAI's ``ATSSMatcher``; nothing is ignored.

    ``num_locations_per_level`` counts locations (``h * w``) per level, not anchors.
    """
    matcher = ATSSMatcher(num_candidates=num_candidates, center_in_gt=center_in_gt)
    _, matched = matcher(boxes.to(anchors.dtype), anchors, num_locations_per_level, anchors_per_location)
    matched = matched.to(anchors.device)
    positive = matched >= 0
    return AnchorMatch(matched, positive, torch.zeros_like(positive))


def default_anchor_sizes(fpn_levels: Sequence[int], scales_per_octave: int = 3) -> tuple[tuple[float, ...], ...]:
    """RetinaNet's anchors: ``4 * stride * 2^(i/scales_per_octave)`` per level."""
    return tuple(
        tuple(4.0 * 2**level * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)) for level in fpn_levels
    )


class _DenseHead(nn.Module):
    """Shared conv tower + output conv over FPN levels -> ``(B, A, outputs)``."""

    def __init__(self, channels: int, outputs: int, anchors_per_location: int, num_convs: int, bias: float) -> None:
        super().__init__()
        self.outputs = outputs
        self.anchors_per_location = anchors_per_location
        self.tower = conv_stack(channels, num_convs)
        self.out = nn.Conv2d(channels, anchors_per_location * outputs, 3, padding=1)
        init_normal([self.tower, self.out])
        nn.init.constant_(self.out.bias, bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        per_level = []
        for feature in features:
            y = self.out(self.tower(feature))  # (B, K*X, h, w)
            b, _, h, w = y.shape
            y = y.view(b, self.anchors_per_location, self.outputs, h, w).permute(0, 3, 4, 1, 2)
            per_level.append(y.reshape(b, h * w * self.anchors_per_location, self.outputs))
        return torch.cat(per_level, dim=1)


class RetinaNet(nn.Module):
    """RetinaNet (Lin et al. 2017) on a one-channel FPN over any registered backbone (ResNet by default).

    Args:
        num_classes: ``C``.
        depth: ResNet depth (18, 34, 50, 101).
        in_channels: image channels.
        base_width: backbone width (None / standard: 64 ResNet & DenseNet, 32 EfficientNet-Lite; e.g. 8 for tiny test models).
        freeze_bn: keep the backbone's BatchNorm frozen.
        fpn_channels: FPN and head width.
        fpn_levels: contiguous pyramid levels in [2, 7]; level ``l`` has stride ``2**l``
            (levels 6, 7 are RetinaNet's extra P6/P7 convs on P5).
        anchor_sizes: per level, the anchor sizes (pixels); all levels need the same count.
            Default: ``4 * stride * (1, 2^(1/3), 2^(2/3))``.
        aspect_ratios: anchor height/width ratios, the same at every level.
        head_convs: conv layers in each head tower.
        prior: initial foreground probability of the classification head.
        matcher: ``"iou"`` (RetinaNet) or ``"atss"``.
        fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches: IoU matcher settings.
        atss_candidates: ATSS candidates per level and anchor shape.
        box_loss: ``"smooth_l1"`` (on encoded deltas, beta ``smooth_l1_beta``) or ``"giou"``.
        focal_alpha, focal_gamma: focal loss parameters.
        score_weighted_box_loss: weight each positive anchor's box loss by its target's score
            (soft targets); no effect on hard targets.
        sync_normaliser: under DDP, divide the losses by the mean positive-anchor count over all
            ranks (one all-reduce of a scalar per training loss), so the averaged gradient is that
            of one process on the global batch. Every rank must then call :meth:`loss` in lockstep.
        backbone: a name of :data:`~cxrdistill.models.backbones.BACKBONES` (e.g.
            ``efficientnet_lite0``); None: ``resnet{depth}``.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 18,
        in_channels: int = 1,
        base_width: int = 64,
        freeze_bn: bool = False,
        fpn_channels: int = 256,
        fpn_levels: Sequence[int] = (3, 4, 5, 6, 7),
        anchor_sizes: Sequence[Sequence[float]] | None = None,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        head_convs: int = 4,
        prior: float = 0.01,
        matcher: str = "iou",
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.4,
        allow_low_quality_matches: bool = True,
        atss_candidates: int = 4,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        score_weighted_box_loss: bool = True,
        sync_normaliser: bool = True,
        backbone: str | None = None,
    ) -> None:
        super().__init__()
        levels = tuple(int(level) for level in fpn_levels)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        contiguous = bool(levels) and levels == tuple(range(levels[0], levels[0] + len(levels)))
        if not contiguous or levels[0] < 2 or levels[-1] > 7 or levels[0] > 5:
            raise ValueError(f"fpn_levels must be contiguous within [2, 7] and start at <= 5, got {fpn_levels}")
        if matcher not in MATCHERS:
            raise ValueError(f"matcher must be one of {MATCHERS}, got {matcher!r}")
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        sizes = tuple(tuple(float(s) for s in level) for level in (anchor_sizes or default_anchor_sizes(levels)))
        if len(sizes) != len(levels) or len({len(s) for s in sizes}) != 1:
            raise ValueError(
                f"anchor_sizes needs one equally long sequence per level ({len(levels)} levels), got {anchor_sizes}"
            )

        self.num_classes = num_classes
        self.fpn_levels = levels
        self.matcher = matcher
        self.fg_iou_thresh, self.bg_iou_thresh = fg_iou_thresh, bg_iou_thresh
        self.allow_low_quality_matches = allow_low_quality_matches
        self.atss_candidates = atss_candidates
        self.box_loss_kind = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.score_weighted_box_loss = score_weighted_box_loss
        self.sync_normaliser = sync_normaliser

        self.backbone = build_backbone(backbone or f"resnet{depth}", in_channels, base_width, freeze_bn=freeze_bn)
        self._backbone_levels = [level for level in levels if level <= 5]
        extra = LastLevelP6P7(2, fpn_channels, fpn_channels) if levels[-1] > 5 else None
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=2,
            in_channels_list=[self.backbone.out_channels[level - 2] for level in self._backbone_levels],
            out_channels=fpn_channels,
            extra_blocks=extra,
        )
        self.anchor_generator = AnchorGenerator(sizes=sizes, aspect_ratios=tuple(aspect_ratios), indexing="xy")
        self.anchors_per_location = self.anchor_generator.num_anchors_per_location()[0]
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.cls_head = _DenseHead(fpn_channels, num_classes, self.anchors_per_location, head_convs, prior_bias(prior))
        self.box_head = _DenseHead(fpn_channels, 4, self.anchors_per_location, head_convs, 0.0)
        self._anchor_cache: dict[tuple, Tensor] = {}

    # ------------------------------------------------------------------ forward
    def anchors_for(self, level_sizes: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> Tensor:
        """``(A, 4)`` xyxy anchors for these feature-map sizes (cached); centres at ``(i + 0.5) * stride``."""
        key = (tuple(level_sizes), str(device), dtype)
        if key not in self._anchor_cache:
            gen = self.anchor_generator
            gen.set_cell_anchors(dtype, device)
            strides = [[torch.tensor(2**level, device=device)] * 2 for level in self.fpn_levels]
            self._anchor_cache[key] = torch.cat(gen.grid_anchors([list(s) for s in level_sizes], strides)).to(dtype)
        return self._anchor_cache[key]

    def forward(self, images: Tensor) -> DetectorOutput:
        """``images (B, 1, H, W)`` in [0, 1] -> :class:`DetectorOutput`."""
        feats = self.backbone(images)
        fpn_in = OrderedDict((f"p{level}", feats[level - 2]) for level in self._backbone_levels)
        fpn_features = list(self.fpn(fpn_in).values())[: len(self.fpn_levels)]
        level_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in fpn_features]
        return DetectorOutput(
            cls_logits=self.cls_head(fpn_features),
            box_deltas=self.box_head(fpn_features),
            anchors=self.anchors_for(level_sizes, images.device, torch.float32),  # fp32 even under AMP
            level_sizes=level_sizes,
            anchors_per_location=self.anchors_per_location,
            fpn_features=fpn_features,
            backbone_feature=feats[-1],
            image_size=(int(images.shape[-2]), int(images.shape[-1])),
        )

    # ----------------------------------------------------------------- matching
    def match(self, out: DetectorOutput, targets: Sequence[Mapping[str, Tensor]]) -> list[AnchorMatch]:
        """Assign ``out.anchors`` to each image's boxes with this model's matcher.

        Boxes flagged in an optional ``"ignore"`` (N,) bool target are matched like the others,
        but their anchors are ignored (neither positive nor negative).
        """
        matches = []
        for target in targets:
            boxes = target["boxes"].to(out.anchors)
            if self.matcher == "atss" and boxes.numel() > 0:
                m = match_anchors_atss(
                    out.anchors,
                    boxes,
                    [h * w for h, w in out.level_sizes],
                    out.anchors_per_location,
                    num_candidates=self.atss_candidates,
                )
            else:
                m = match_anchors(
                    out.anchors, boxes, self.fg_iou_thresh, self.bg_iou_thresh, self.allow_low_quality_matches
                )
            if "ignore" in target and boxes.numel() > 0:
                flagged = target["ignore"].to(torch.bool).to(m.matched_idx.device)[m.matched_idx.clamp(min=0)]
                flagged &= m.positive
                m = AnchorMatch(torch.where(flagged, -1, m.matched_idx), m.positive & ~flagged, m.ignore | flagged)
            matches.append(m)
        return matches

    # --------------------------------------------------------------------- loss
    def loss(
        self,
        out: DetectorOutput,
        targets: Sequence[Mapping[str, Tensor]],
        weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Focal classification loss and box regression loss.

        Args:
            out: the forward output for the batch.
            targets: per image ``{"boxes": (N, 4), "labels": (N,)}`` plus optional ``"scores"``
                (N,) soft targets in [0, 1] (the matched anchor's target for its class) and
                ``"ignore"`` (N,) bool.
            weights: optional ``(B,)`` per-image loss weights (0 drops an image).

        Returns:
            ``{"cls": scalar, "box": scalar}``: per-image sums over anchors, weighted by ``weights``,
            divided by the number of positive anchors in the images with weight > 0 (at least 1).
        """
        logits, deltas, anchors = out.cls_logits.float(), out.box_deltas.float(), out.anchors.float()
        batch, num_anchors, num_classes = logits.shape
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
        boxes, labels, scores = _pad_targets(targets, num_classes, logits.device, logits.dtype)
        matches = self.match(out, targets)
        matched = torch.stack([m.matched_idx for m in matches]).clamp(min=0)  # (B, A)
        positive = torch.stack([m.positive for m in matches])
        ignore = torch.stack([m.ignore for m in matches])
        weights = _image_weights(weights, batch, logits)

        cls_target = torch.zeros_like(logits)
        pos_labels = labels.gather(1, matched)  # (B, A)
        pos_scores = scores.gather(1, matched) * positive
        cls_target.scatter_(2, pos_labels.unsqueeze(-1), pos_scores.unsqueeze(-1))
        focal = sigmoid_focal_loss(logits, cls_target, self.focal_alpha, self.focal_gamma)
        cls_per_image = (focal.sum(-1) * ~ignore).sum(-1)  # (B,)
        # positives of the images that take part (weight > 0); at least 1
        normaliser = (positive.sum(dim=1) * (weights > 0)).sum().to(logits.dtype)
        if self.sync_normaliser and torch.is_grad_enabled():
            normaliser = global_mean(normaliser)
        normaliser = normaliser.clamp(min=1)

        # dense over (B, A), masked by `positive`: no data-dependent shapes, no host sync
        gt_boxes = boxes.gather(1, matched.unsqueeze(-1).expand(-1, -1, 4))  # (B, A, 4)
        anchors_b = anchors.unsqueeze(0).expand(batch, -1, -1)
        gt_boxes = torch.where(positive.unsqueeze(-1), gt_boxes, anchors_b)  # finite targets off the positives
        if self.box_loss_kind == "giou":
            pred = self.box_coder.decode_single(deltas.reshape(-1, 4), anchors_b.reshape(-1, 4))
            box_each = giou_loss(pred, gt_boxes.reshape(-1, 4)).reshape(batch, num_anchors)
        else:
            encoded = self.box_coder.encode_single(gt_boxes.reshape(-1, 4), anchors_b.reshape(-1, 4))
            box_each = F.smooth_l1_loss(
                deltas.reshape(-1, 4), encoded, beta=self.smooth_l1_beta, reduction="none"
            ).sum(-1).reshape(batch, num_anchors)
        box_weight = weights.unsqueeze(1) * positive
        if self.score_weighted_box_loss:
            box_weight = box_weight * pos_scores
        box_each = torch.where(positive, box_each, torch.zeros_like(box_each))
        return {
            "cls": (cls_per_image * weights).sum() / normaliser,
            "box": (box_each * box_weight).sum() / normaliser,
        }

    # ------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(
        self,
        out: DetectorOutput,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        max_detections: int = 100,
        topk_candidates: int = 1000,
    ) -> list[dict[str, Tensor]]:
        """Raw outputs -> per image ``{"boxes": (K, 4), "scores": (K,), "labels": (K,)}``.

        Keeps the ``topk_candidates`` best (anchor, class) pairs per image, drops scores
        ``<= score_thresh``, clips boxes to the image, runs per-class NMS for the whole batch at once
        and returns at most ``max_detections`` boxes per image, sorted by decreasing score.
        """
        probs = torch.sigmoid(out.cls_logits.float())  # (B, A, C)
        batch, num_anchors, num_classes = probs.shape
        k = min(topk_candidates, num_anchors * num_classes)
        scores, flat = probs.reshape(batch, -1).topk(k, dim=1)  # sorted, (B, k)
        anchor_idx, labels = flat // num_classes, flat % num_classes
        deltas = out.box_deltas.float().gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, 4))
        boxes = self.box_coder.decode_single(deltas.reshape(-1, 4), out.anchors.float()[anchor_idx.reshape(-1)])
        boxes = boxes.reshape(batch, k, 4)
        height, width = out.image_size
        upper = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.minimum(boxes.clamp(min=0), upper)
        valid = (scores > score_thresh) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        keep = batched_nms_sorted(boxes, labels, valid, nms_thresh, max_keep=max_detections)
        keep &= keep.cumsum(dim=1) <= max_detections
        return [
            {"boxes": boxes[b][keep[b]], "scores": scores[b][keep[b]], "labels": labels[b][keep[b]]}
            for b in range(batch)
        ]

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        max_detections: int = 100,
        topk_candidates: int = 1000,
    ) -> list[dict[str, Tensor]]:
        """Detections for ``images (B, 1, H, W)``: eval mode, no gradients, :meth:`decode`;
        the module's train/eval mode is restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            return self.decode(self(images), score_thresh, nms_thresh, max_detections, topk_candidates)
        finally:
            self.train(was_training)


def batched_nms_sorted(
    boxes: Tensor, labels: Tensor, valid: Tensor, iou_thresh: float, max_keep: int | None = None, block: int = 128
) -> Tensor:
    """Greedy per-class NMS for a batch, solved block by block of ranks instead of box by box.

    Args:
        boxes: ``(B, K, 4)`` xyxy, each row sorted by decreasing score.
        labels: ``(B, K)`` class per box (boxes of different classes never suppress each other).
        valid: ``(B, K)`` bool, boxes taking part.
        iou_thresh: a box is suppressed by a kept, higher-scoring box of its class with IoU above this.
        max_keep: stop once every image has this many kept boxes (later ranks are returned False);
            ``None`` decides every rank.
        block: ranks decided together.

    Returns:
        ``(B, K)`` bool keep mask, identical to sequential greedy NMS (up to ``max_keep``). The ranks
        are taken in blocks: a block's boxes are first suppressed by the kept boxes of all earlier
        blocks (one IoU matrix), then the block is solved as the fixed point of ``keep_i = alive_i
        and no kept j < i of the block suppresses i``; each pass fixes at least one more rank, and it
        usually converges in a few. Work: one ``K x K`` IoU plus ``K / block`` small fixed points,
        instead of a ``K x K`` pass per link of the longest suppression chain.
    """
    batch, k = boxes.shape[:2]
    keep = torch.zeros_like(valid)
    for start in range(0, k, block):
        stop = min(start + block, k)
        alive = valid[:, start:stop].clone()
        box_block, label_block = boxes[:, start:stop], labels[:, start:stop]
        if start > 0:
            by_earlier = (pairwise_box_iou(boxes[:, :start], box_block) > iou_thresh)  # (B, start, b)
            by_earlier &= labels[:, :start].unsqueeze(2) == label_block.unsqueeze(1)
            by_earlier &= keep[:, :start].unsqueeze(2)
            alive &= ~by_earlier.any(dim=1)
        size = stop - start
        earlier = torch.ones(size, size, dtype=torch.bool, device=boxes.device).triu(1)  # [j, i]: j above i
        suppresses = (pairwise_box_iou(box_block, box_block) > iou_thresh) & earlier
        suppresses &= label_block.unsqueeze(2) == label_block.unsqueeze(1)
        suppresses &= alive.unsqueeze(2) & alive.unsqueeze(1)
        block_keep = alive.clone()
        for _ in range(size):
            new_keep = alive & ~(suppresses & block_keep.unsqueeze(2)).any(dim=1)
            if torch.equal(new_keep, block_keep):
                break
            block_keep = new_keep
        keep[:, start:stop] = block_keep
        if max_keep is not None and stop < k and bool((keep.sum(dim=1) >= max_keep).all()):
            break
    return keep


def _pad_targets(
    targets: Sequence[Mapping[str, Tensor]], num_classes: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate targets and stack them into ``boxes (B, N, 4)``, ``labels (B, N)``, ``scores (B, N)``.

    Shapes are checked per image (host metadata, free); values with one combined check of the
    padded batch (one host sync), which names the first bad image only when it fails. With
    :data:`CHECK_TARGETS_PER_IMAGE` each image is checked on its own instead.
    """
    n_max = max([1] + [int(t["boxes"].shape[0]) for t in targets])
    batch = len(targets)
    boxes = torch.zeros(batch, n_max, 4, device=device, dtype=dtype)
    labels = torch.zeros(batch, n_max, dtype=torch.long, device=device)
    scores = torch.zeros(batch, n_max, device=device, dtype=dtype)
    real = torch.zeros(batch, n_max, dtype=torch.bool)
    for i, target in enumerate(targets):
        b = target["boxes"]
        n = b.shape[0]
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"target {i}: boxes must be (N, 4) xyxy, got shape {tuple(b.shape)}")
        lab = target["labels"]
        if lab.shape != (n,):
            raise ValueError(f"target {i}: labels must be ({n},), got shape {tuple(lab.shape)}")
        s = target.get("scores")
        if s is not None and s.shape != (n,):
            raise ValueError(f"target {i}: scores must be ({n},) in [0, 1], got shape {tuple(s.shape)}")
        if n == 0:
            continue
        if CHECK_TARGETS_PER_IMAGE:
            _check_target_values(i, b, lab, s, num_classes)
        boxes[i, :n] = b.to(device=device, dtype=dtype)
        labels[i, :n] = lab.to(device)
        scores[i, :n] = 1.0 if s is None else s.to(device=device, dtype=dtype)
        real[i, :n] = True
    if not CHECK_TARGETS_PER_IMAGE:
        real = real.to(device)
        ok = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        ok &= (labels >= 0) & (labels < num_classes) & (scores >= 0) & (scores <= 1)
        if bool((real & ~ok).any()):  # the batch's one host sync; find and name the culprit
            for i, target in enumerate(targets):
                if target["boxes"].shape[0]:
                    _check_target_values(i, target["boxes"], target["labels"], target.get("scores"), num_classes)
    return boxes, labels, scores


def _check_target_values(i: int, b: Tensor, lab: Tensor, s: Tensor | None, num_classes: int) -> None:
    """Raise a ValueError naming target ``i`` when its boxes, labels or scores are out of range."""
    if not ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all():
        raise ValueError(f"target {i}: every box needs x2 > x1 and y2 > y1, got {b.tolist()}")
    if lab.min() < 0 or lab.max() >= num_classes:
        raise ValueError(f"target {i}: labels must lie in [0, {num_classes}), got {lab.tolist()}")
    if s is not None and (s.min() < 0 or s.max() > 1):
        raise ValueError(f"target {i}: scores must be ({len(s)},) in [0, 1], got {s.tolist()}")


def _image_weights(weights: Tensor | None, batch: int, like: Tensor) -> Tensor:
    """``(B,)`` per-image weights (ones when ``None``)."""
    if weights is None:
        return torch.ones(batch, device=like.device, dtype=like.dtype)
    weights = torch.as_tensor(weights, device=like.device, dtype=like.dtype)
    if weights.shape != (batch,):
        raise ValueError(f"weights must have shape ({batch},), got {tuple(weights.shape)}")
    return weights
