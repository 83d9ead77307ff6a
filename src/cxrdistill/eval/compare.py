"""Paired comparison of two runs on the same test set, with a paired bootstrap over images.

Both runs are scored on the *same* resampled image sets (seeded), so image difficulty cancels out.
For each metric we report run A, run B, the difference ``B - A``, its percentile 95% CI, and
``p_boot = min(1, 2 * min(P*(diff <= 0), P*(diff >= 0)))`` — the two-sided fraction of bootstrap
replicates on the other side of zero. It is a p-value-like summary, not an exact test.
Detection re-uses each run's per-image matching (:func:`~cxrdistill.eval.detection.match_detections`),
so a replicate only costs an accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cxrdistill.eval.classification import bootstrap_indices, macro_auroc_replicates
from cxrdistill.eval.detection import CocoParams, accumulate, match_detections
from cxrdistill.eval.predictions import GroundTruth

__all__ = ["PairedComparison", "paired_stats", "compare_detection", "compare_auroc"]


@dataclass
class PairedComparison:
    """One metric of two runs: values, difference B - A, its CI, and the bootstrap fraction ``p_boot``."""

    metric: str
    a: float
    b: float
    diff: float
    ci_low: float
    ci_high: float
    p_boot: float
    n_boot: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def paired_stats(metric: str, a: float, b: float, boot_a: np.ndarray, boot_b: np.ndarray, seed: int,
                 alpha: float = 0.05) -> PairedComparison:
    """Summarise replicate values of two runs ``(R,)`` (NaN replicates are left out)."""
    d = np.asarray(boot_b, dtype=float) - np.asarray(boot_a, dtype=float)
    d = d[~np.isnan(d)]
    if not d.size or math.isnan(a) or math.isnan(b):
        return PairedComparison(metric, a, b, b - a, math.nan, math.nan, math.nan, len(boot_a), seed)
    lo, hi = np.percentile(d, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return PairedComparison(metric, float(a), float(b), float(b - a), float(lo), float(hi), p, len(boot_a), seed)


def compare_detection(gt: GroundTruth, rows_a: Sequence[dict], rows_b: Sequence[dict],
                      params: CocoParams | None = None, iou: float | None = None,
                      n_boot: int = 1000, seed: int = 0) -> PairedComparison:
    """mAP (at ``iou``, or the mean over the thresholds) of runs A and B with a paired bootstrap."""
    ma, mb = match_detections(gt, rows_a, params), match_detections(gt, rows_b, params)
    a, b = accumulate(ma, main_only=True).ap(iou), accumulate(mb, main_only=True).ap(iou)
    idx = bootstrap_indices(ma.n_images, n_boot, seed)
    ba = np.array([accumulate(ma, i, main_only=True).ap(iou) for i in idx])
    bb = np.array([accumulate(mb, i, main_only=True).ap(iou) for i in idx])
    name = "mAP" if iou is None else f"mAP@{iou:g}"
    return paired_stats(name, a, b, ba, bb, seed)


def compare_auroc(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                  n_boot: int = 1000, seed: int = 0) -> PairedComparison:
    """Macro AUROC of runs A and B ``(N, C)`` scores on the same truth ``(N, C)``, paired bootstrap."""
    from cxrdistill.eval.classification import auroc

    def macro(s: np.ndarray) -> float:
        v = auroc(y_true, s)
        v = v[~np.isnan(v)]
        return float(v.mean()) if v.size else math.nan

    idx = bootstrap_indices(len(y_true), n_boot, seed)
    _, ba = macro_auroc_replicates(y_true, scores_a, idx)
    _, bb = macro_auroc_replicates(y_true, scores_b, idx)
    return paired_stats("macro_AUROC", macro(scores_a), macro(scores_b), ba, bb, seed)
