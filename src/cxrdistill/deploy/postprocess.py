"""Numpy post-processing of exported models (no torch): what stays outside the ONNX graph.

Mirrors ``RetinaNet.decode`` (top-k (anchor, class) pairs, MONAI ``BoxCoder`` decoding, clipping,
greedy per-class NMS, ``max_detections``) and ``heatmap.maps_to_detections``. Shapes: ``A``
anchors, ``C`` classes; boxes xyxy in pixels of the network input.
"""

from __future__ import annotations

import math

import numpy as np

BOX_XFORM_CLIP = math.log(1000.0 / 16)  # MONAI BoxCoder's default clamp on log-size deltas

__all__ = ["sigmoid", "decode_boxes", "box_iou", "nms_per_class", "retinanet_detections", "heatmap_detections"]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float32)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def decode_boxes(deltas: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """``deltas (N, 4)`` (dx, dy, dw, dh) relative to ``anchors (N, 4)`` xyxy -> boxes ``(N, 4)`` xyxy."""
    deltas = deltas.astype(np.float32)
    anchors = anchors.astype(np.float32)
    wh = anchors[:, 2:] - anchors[:, :2]
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    pred_ctr = deltas[:, :2] * wh + ctr
    pred_wh = np.exp(np.minimum(deltas[:, 2:], BOX_XFORM_CLIP)) * wh
    return np.concatenate([pred_ctr - 0.5 * pred_wh, pred_ctr + 0.5 * pred_wh], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """IoU of every pair: ``(N, 4)`` x ``(M, 4)`` -> ``(N, M)``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, eps)


def nms_per_class(boxes: np.ndarray, labels: np.ndarray, iou_thresh: float, max_keep: int) -> np.ndarray:
    """Greedy NMS of boxes sorted by decreasing score; boxes of different classes never suppress
    each other. Returns the kept indices (at most ``max_keep``), in score order."""
    keep: list[int] = []
    suppressed = np.zeros(len(boxes), dtype=bool)
    iou = box_iou(boxes, boxes) if len(boxes) else np.zeros((0, 0))
    for i in range(len(boxes)):
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) >= max_keep:
            break
        suppressed |= (iou[i] > iou_thresh) & (labels == labels[i])
    return np.asarray(keep, dtype=np.int64)


def retinanet_detections(cls_logits: np.ndarray, box_deltas: np.ndarray, anchors: np.ndarray,
                         image_size: tuple[int, int], score_thresh: float = 0.05, nms_thresh: float = 0.5,
                         max_detections: int = 100, topk_candidates: int = 1000) -> dict[str, np.ndarray]:
    """One image's raw RetinaNet outputs ``cls_logits (A, C)``, ``box_deltas (A, 4)`` -> detections
    ``{"boxes": (K, 4), "scores": (K,), "labels": (K,)}`` sorted by decreasing score
    (``image_size`` = ``(H, W)`` of the network input; boxes are clipped to it)."""
    probs = sigmoid(cls_logits).reshape(-1)
    num_classes = cls_logits.shape[1]
    k = min(topk_candidates, probs.size)
    order = np.argsort(-probs, kind="stable")[:k]
    scores = probs[order]
    anchor_idx, labels = order // num_classes, order % num_classes
    boxes = decode_boxes(box_deltas[anchor_idx], anchors[anchor_idx])
    height, width = image_size
    boxes = np.minimum(np.maximum(boxes, 0), np.array([width, height, width, height], dtype=np.float32))
    valid = (scores > score_thresh) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
    keep = nms_per_class(boxes, labels, nms_thresh, max_detections)
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep].astype(np.int64)}


def heatmap_detections(probs: np.ndarray, threshold: float, stride: int) -> dict[str, np.ndarray]:
    """One image's probability maps ``(C, h, w)`` -> a box per 8-connected region above
    ``threshold`` (scored by its peak), like ``models.heatmap.maps_to_detections``."""
    from scipy import ndimage

    boxes, scores, labels = [], [], []
    for cls, prob in enumerate(probs):
        regions, count = ndimage.label(prob > threshold, structure=np.ones((3, 3), dtype=bool))
        if count == 0:
            continue
        peaks = np.atleast_1d(ndimage.maximum(prob, labels=regions, index=np.arange(1, count + 1)))
        for (sy, sx), peak in zip(ndimage.find_objects(regions), peaks):
            boxes.append([sx.start * stride, sy.start * stride, sx.stop * stride, sy.stop * stride])
            scores.append(float(peak))
            labels.append(cls)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return {"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[order],
            "scores": np.asarray(scores, dtype=np.float32)[order], "labels": np.asarray(labels, dtype=np.int64)[order]}
