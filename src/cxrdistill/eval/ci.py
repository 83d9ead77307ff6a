"""Bootstrap confidence intervals for detection metrics, and the FROC operating point.

`detection_cis` resamples the images of a split (seeded, with replacement) and gives percentile
95% CIs of mAP at each IoU threshold, mAP@[thresholds] and the lesion-FROC score (mean over
classes). Detection re-uses one per-image matching (`eval.detection.match_detections`), so a
replicate is an accumulation; FROC re-scores the resampled per-image hit lists.
`froc_threshold` is the score threshold at which the predictions make at most ``fp_per_image``
false positives per image (lesion-FROC hits, all classes pooled): the report's default box cut-off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cxrdistill.eval.classification import bootstrap_indices
from cxrdistill.eval.detection import CocoParams, accumulate, match_detections
from cxrdistill.eval.froc import _hits, _per_image, lesion_froc
from cxrdistill.eval.predictions import GroundTruth

__all__ = ["detection_cis", "froc_threshold"]


def _percentile_ci(values: Sequence[float], alpha: float = 0.05) -> list[float] | None:
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if not v.size:
        return None
    lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(lo), float(hi)]


def detection_cis(gt: GroundTruth, rows: Sequence[dict[str, Any]], iou: Sequence[float] = (0.25, 0.5, 0.75),
                  n_boot: int = 200, seed: int = 0, froc_criterion: str = "center") -> dict[str, Any]:
    """``{"mAP@t": [lo, hi], "mAP": [lo, hi], "FROC": [lo, hi], "n_boot", "seed"}`` (None: undefined)."""
    params = CocoParams(iou_thresholds=tuple(float(t) for t in iou))
    match = match_detections(gt, rows, params)
    idx = bootstrap_indices(match.n_images, n_boot, seed)
    out: dict[str, Any] = {"n_boot": n_boot, "seed": seed, "method": "percentile bootstrap over images"}
    reps = [accumulate(match, i, main_only=True) for i in idx]
    for t in params.iou_thresholds:
        out[f"mAP@{t:g}"] = _percentile_ci([r.ap(t) for r in reps])
    out["mAP"] = _percentile_ci([r.ap() for r in reps])
    per_class = [_per_image(gt, rows, cid) for cid in gt.category_ids]
    froc_reps = []
    for i in idx:
        scores = [lesion_froc([g[j] for j in i], [d[j] for j in i], [s[j] for j in i], criterion=froc_criterion).score
                  for g, d, s in per_class]
        scores = [s for s in scores if not math.isnan(s)]
        froc_reps.append(float(np.mean(scores)) if scores else math.nan)
    out["FROC"] = _percentile_ci(froc_reps)
    return out


def froc_threshold(gt: GroundTruth, rows: Sequence[dict[str, Any]], fp_per_image: float = 1.0,
                   criterion: str = "center") -> float | None:
    """Lowest detection score ``t`` such that boxes scoring ``>= t`` make at most ``fp_per_image``
    false positives per image (all classes pooled). None without predictions."""
    if not rows:
        return None
    all_scores, fp_scores = [], []
    for cid in gt.category_ids:
        for g, d, s in zip(*_per_image(gt, rows, cid)):
            g = np.asarray(g, float).reshape(-1, 4)
            d = np.asarray(d, float).reshape(-1, 4)
            s = np.asarray(s, float)
            hit = _hits(d, g, criterion, 0.5) if len(g) and len(d) else np.zeros((len(d), len(g)), bool)
            all_scores.append(s)
            fp_scores.append(s[~hit.any(axis=1)])
    scores = np.sort(np.concatenate(all_scores))[::-1]
    fps = np.concatenate(fp_scores)
    budget = fp_per_image * max(len(gt.image_ids), 1)
    best = None
    for t in np.unique(scores)[::-1]:
        if (fps >= t).sum() > budget:
            break
        best = float(t)
    return best if best is not None else float(scores[0]) + 1e-6
