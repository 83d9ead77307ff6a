"""FROC: lesion-level sensitivity vs false positives per image, and the AALS modified FROC for maps.

**Lesion FROC** (:func:`lesion_froc`). A detection *hits* a lesion of its class in its image when
``criterion="center"`` (default): the detection's box centre lies inside the lesion box
(``x1 <= cx <= x2`` and ``y1 <= cy <= y2``), or ``criterion="iou"``: IoU ≥ ``iou_threshold``.
A lesion's score is the highest score of the detections hitting it (missed: never detected); a
detection hitting no lesion is a false positive; a detection hitting an already-hit lesion is
neither (as CAMELYON16 / MONAI's ``compute_froc_curve_data``). At each score threshold,
sensitivity = hit lesions / lesions and FPs per image = false positives / images. Sensitivity at
a rate *r* is the best sensitivity of a threshold with at most *r* FPs per image (no interpolation);
the FROC score is the mean over ``fp_rates`` (default 1/8, 1/4, 1/2, 1, 2, 4, 8).

**Modified FROC** (AALS, Wang et al. 2021, Sec. 4 "Evaluation metrics"), for probability maps
(:class:`ModifiedFroc`). At a threshold *t* a pixel is activated when ``map >= t``. A lesion is
recalled when the pixel at its box centre is activated; false-positive pixels are activated
pixels outside every GT box of that class (a pixel touched by a box counts as inside); the FP
ratio of an image is FP pixels / all pixels, averaged over images. The score is the mean recall
at FP ratios 1%, 2%, ..., 10% (best recall of a threshold within each ratio). Thresholds are the
``bins + 1`` levels ``j / bins`` of [0, 1], accumulated image by image as histograms, so maps of
any number of images stream through in constant memory. Detectors are scored the AALS way: boxes
become a map whose pixel value is the highest score of the boxes covering it
(:func:`boxes_to_score_map`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from cxrdistill.errors import CxrDistillError

if TYPE_CHECKING:
    from cxrdistill.eval.predictions import GroundTruth

__all__ = [
    "FROC_FP_RATES",
    "AALS_FP_RATIOS",
    "FrocResult",
    "lesion_froc",
    "ModifiedFroc",
    "boxes_to_score_map",
    "sensitivity_at",
    "lesion_froc_per_class",
    "modified_froc_from_boxes",
]

FROC_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
AALS_FP_RATIOS: tuple[float, ...] = tuple(np.round(np.arange(1, 11) / 100, 2).tolist())


@dataclass
class FrocResult:
    """An FROC curve (``fp`` and ``sensitivity``, one point per threshold, FP increasing), the
    sensitivity at each requested rate, and their mean (NaN when there is no lesion)."""

    fp: np.ndarray
    sensitivity: np.ndarray
    rates: tuple[float, ...]
    sensitivity_at_rates: np.ndarray
    score: float
    n_lesions: int
    n_images: int

    def to_dict(self) -> dict:
        f = (lambda x: None if math.isnan(x) else float(x))
        return {"score": f(self.score), "n_lesions": self.n_lesions, "n_images": self.n_images,
                "sensitivity_at": {f"{r:g}": f(s) for r, s in zip(self.rates, self.sensitivity_at_rates)}}


def sensitivity_at(fp: np.ndarray, sensitivity: np.ndarray, rates: Sequence[float]) -> np.ndarray:
    """Best sensitivity among operating points with ``fp <= rate``, for each rate ``(len(rates),)``."""
    out = np.zeros(len(rates))
    for i, r in enumerate(rates):
        ok = fp <= r + 1e-12
        out[i] = sensitivity[ok].max() if ok.any() else 0.0
    return out


def _hits(det: np.ndarray, gt: np.ndarray, criterion: str, iou_threshold: float) -> np.ndarray:
    """``bool (K, N)``: detection k hits lesion n. Boxes xyxy."""
    if criterion == "center":
        cx = (det[:, 0] + det[:, 2]) / 2
        cy = (det[:, 1] + det[:, 3]) / 2
        return ((cx[:, None] >= gt[None, :, 0]) & (cx[:, None] <= gt[None, :, 2])
                & (cy[:, None] >= gt[None, :, 1]) & (cy[:, None] <= gt[None, :, 3]))
    if criterion == "iou":
        w = np.minimum(det[:, None, 2], gt[None, :, 2]) - np.maximum(det[:, None, 0], gt[None, :, 0])
        h = np.minimum(det[:, None, 3], gt[None, :, 3]) - np.maximum(det[:, None, 1], gt[None, :, 1])
        inter = np.clip(w, 0, None) * np.clip(h, 0, None)
        area_d = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
        area_g = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
        union = area_d[:, None] + area_g[None, :] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, inter / union, 0.0) >= iou_threshold
    raise ValueError(f"criterion must be 'center' or 'iou', got {criterion!r}")


def lesion_froc(
    gt_boxes: Sequence[np.ndarray],
    det_boxes: Sequence[np.ndarray],
    det_scores: Sequence[np.ndarray],
    rates: Sequence[float] = FROC_FP_RATES,
    criterion: Literal["center", "iou"] = "center",
    iou_threshold: float = 0.5,
) -> FrocResult:
    """Lesion-level FROC of one class over images.

    ``gt_boxes[i]``: ``(N_i, 4)`` xyxy lesions of image i; ``det_boxes[i]``: ``(K_i, 4)`` xyxy and
    ``det_scores[i]``: ``(K_i,)`` detections of image i (all lists have one entry per image).
    """
    if not (len(gt_boxes) == len(det_boxes) == len(det_scores)):
        raise ValueError("gt_boxes, det_boxes and det_scores need one entry per image")
    lesion_scores, fp_scores = [], []
    for gt, det, sc in zip(gt_boxes, det_boxes, det_scores):
        gt = np.asarray(gt, dtype=float).reshape(-1, 4)
        det = np.asarray(det, dtype=float).reshape(-1, 4)
        sc = np.asarray(sc, dtype=float).reshape(-1)
        if len(det) != len(sc):
            raise ValueError(f"{len(det)} boxes but {len(sc)} scores in one image")
        hit = _hits(det, gt, criterion, iou_threshold) if len(gt) and len(det) else np.zeros((len(det), len(gt)), bool)
        lesion_scores.append(np.where(hit, sc[:, None], -np.inf).max(axis=0) if len(det) else np.full(len(gt), -np.inf))
        fp_scores.append(sc[~hit.any(axis=1)])
    les = np.concatenate(lesion_scores) if lesion_scores else np.zeros(0)
    fps = np.concatenate(fp_scores) if fp_scores else np.zeros(0)
    n_img, n_les = len(gt_boxes), len(les)
    thr = np.unique(np.concatenate([les[np.isfinite(les)], fps]))[::-1]  # descending
    fp_curve = np.concatenate([[0.0], (fps[None, :] >= thr[:, None]).sum(1) / max(n_img, 1)])
    sens_curve = np.concatenate([[0.0], (les[None, :] >= thr[:, None]).sum(1) / n_les]) if n_les else \
        np.full(len(thr) + 1, math.nan)
    at = sensitivity_at(fp_curve, sens_curve, rates) if n_les else np.full(len(rates), math.nan)
    return FrocResult(fp=fp_curve, sensitivity=sens_curve, rates=tuple(rates), sensitivity_at_rates=at,
                      score=float(np.mean(at)) if n_les else math.nan, n_lesions=n_les, n_images=n_img)


def boxes_to_score_map(boxes: np.ndarray, scores: np.ndarray, height: int, width: int) -> np.ndarray:
    """``float32 (H, W)`` map: each pixel holds the highest score of the xyxy boxes covering it (0 if none)."""
    out = np.zeros((height, width), dtype=np.float32)
    for (x1, y1, x2, y2), s in zip(np.asarray(boxes, dtype=float).reshape(-1, 4), np.asarray(scores).reshape(-1)):
        r0, r1 = max(int(math.floor(y1)), 0), min(int(math.ceil(y2)), height)
        c0, c1 = max(int(math.floor(x1)), 0), min(int(math.ceil(x2)), width)
        if r1 > r0 and c1 > c0:
            np.maximum(out[r0:r1, c0:c1], s, out=out[r0:r1, c0:c1])
    return out


class ModifiedFroc:
    """Streaming AALS modified FROC of one class: call :meth:`add` per image, then :meth:`result`."""

    def __init__(self, bins: int = 1000, ratios: Sequence[float] = AALS_FP_RATIOS) -> None:
        self.bins = bins
        self.ratios = tuple(ratios)
        self._fp = np.zeros(bins + 1)  # sum over images of FP-pixel fraction per level
        self._centre = np.zeros(bins + 1)  # lesion centres per level
        self.n_images = 0
        self.n_lesions = 0

    def _levels(self, values: np.ndarray) -> np.ndarray:
        return np.clip(np.floor(values.astype(np.float64) * self.bins), 0, self.bins).astype(np.int64)

    def add(self, prob_map: np.ndarray, boxes: np.ndarray) -> None:
        """One image: ``prob_map (H, W)`` in [0, 1] and its lesion boxes ``(N, 4)`` xyxy in map pixels."""
        m = np.asarray(prob_map)
        if m.ndim != 2:
            raise ValueError(f"probability map must be (H, W), got shape {m.shape}")
        if m.size and (np.nanmin(m) < 0 or np.nanmax(m) > 1 or np.isnan(m).any()):
            raise ValueError("probability map values must lie in [0, 1] (no NaN)")
        h, w = m.shape
        inside = np.zeros((h, w), dtype=bool)
        boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
        for x1, y1, x2, y2 in boxes:
            inside[max(int(math.floor(y1)), 0):min(int(math.ceil(y2)), h),
                   max(int(math.floor(x1)), 0):min(int(math.ceil(x2)), w)] = True
            cx = min(max(int(math.floor((x1 + x2) / 2)), 0), w - 1)
            cy = min(max(int(math.floor((y1 + y2) / 2)), 0), h - 1)
            self._centre[self._levels(np.array([m[cy, cx]]))[0]] += 1
        self._fp += np.bincount(self._levels(m[~inside]), minlength=self.bins + 1) / (h * w)
        self.n_images += 1
        self.n_lesions += len(boxes)

    def result(self) -> FrocResult:
        """Curve over levels (FP ratio increasing), recall at each ratio, and their mean."""
        # activated at level j <=> value level >= j  → counts are reverse cumulative sums
        fp = np.concatenate([[0.0], np.cumsum(self._fp[::-1]) / max(self.n_images, 1)])
        if self.n_lesions:
            rec = np.concatenate([[0.0], np.cumsum(self._centre[::-1]) / self.n_lesions])
            at = sensitivity_at(fp, rec, self.ratios)
            score = float(np.mean(at))
        else:
            rec, at, score = np.full(len(fp), math.nan), np.full(len(self.ratios), math.nan), math.nan
        return FrocResult(fp=fp, sensitivity=rec, rates=self.ratios, sensitivity_at_rates=at, score=score,
                          n_lesions=self.n_lesions, n_images=self.n_images)


def _xyxy(b: Sequence[float]) -> list[float]:
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def _per_image(gt: GroundTruth, rows: Sequence[dict], category_id: int) -> tuple[list, list, list]:
    ids = gt.image_ids
    g: dict[int, list] = {i: [] for i in ids}
    d: dict[int, list] = {i: [] for i in ids}
    s: dict[int, list] = {i: [] for i in ids}
    for a in gt.coco["annotations"]:
        if a["category_id"] == category_id and not a.get("iscrowd", 0):
            g[a["image_id"]].append(_xyxy(a["bbox"]))
    for r in rows:
        if r["category_id"] == category_id:
            d[r["image_id"]].append(_xyxy(r["bbox"]))
            s[r["image_id"]].append(r["score"])
    return [g[i] for i in ids], [d[i] for i in ids], [s[i] for i in ids]


def lesion_froc_per_class(gt: GroundTruth, rows: Sequence[dict], **kwargs) -> dict[str, FrocResult]:
    """:func:`lesion_froc` for each class of ``gt`` from COCO-format predictions (crowd boxes are not lesions)."""
    return {name: lesion_froc(*_per_image(gt, rows, cid), **kwargs)
            for name, cid in zip(gt.class_names, gt.category_ids)}


def modified_froc_from_boxes(gt: GroundTruth, rows: Sequence[dict], bins: int = 1000,
                             ratios: Sequence[float] = AALS_FP_RATIOS) -> dict[str, FrocResult]:
    """AALS modified FROC of a detector per class: its boxes drawn as score maps at the image size."""
    missing = [im["id"] for im in gt.coco["images"] if not im.get("width") or not im.get("height")]
    if missing:
        raise CxrDistillError(f"images {missing[:5]} have no width/height in the manifest; needed to draw box maps")
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in gt.coco["images"]}
    out = {}
    for name, cid in zip(gt.class_names, gt.category_ids):
        acc = ModifiedFroc(bins=bins, ratios=ratios)
        for iid, g, d, s in zip(gt.image_ids, *_per_image(gt, rows, cid)):
            h, w = sizes[iid]
            acc.add(boxes_to_score_map(np.array(d).reshape(-1, 4), np.array(s), h, w), np.array(g).reshape(-1, 4))
        out[name] = acc.result()
    return out
