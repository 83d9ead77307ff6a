"""Image-level classification: per-class and macro AUROC with seeded bootstrap 95% CIs.

Scores come from a classifier, or for detectors / heat-map models from the maximum box score /
map value per class (AALS). The point estimate is scikit-learn's ``roc_auc_score``; bootstrap
replicates use the equivalent rank (Mann-Whitney) formula, vectorised over replicates. A class
whose truth has a single value (all 0 or all 1) has an *undefined* AUROC (NaN / ``None``); a
replicate in which a class is single-valued is left out of that class's CI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

__all__ = ["AurocResult", "auroc", "auroc_ranks", "bootstrap_auroc", "classification_summary"]


def auroc(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class AUROC ``(C,)`` from truth and scores ``(N, C)`` (scikit-learn); NaN when undefined."""
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=float)
    out = np.full(y_true.shape[1], math.nan)
    for c in range(y_true.shape[1]):
        if 0 < y_true[:, c].sum() < len(y_true):
            out[c] = roc_auc_score(y_true[:, c], scores[:, c])
    return out


def auroc_ranks(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of one class for many replicates at once: ``y_true, scores (R, N)`` → ``(R,)`` (NaN if undefined).

    ``(sum of positive ranks - n1 (n1 + 1) / 2) / (n1 n0)`` with average ranks for ties — equal to
    scikit-learn's trapezoidal AUROC.
    """
    y = np.asarray(y_true, dtype=bool)
    ranks = rankdata(scores, axis=-1)
    n1 = y.sum(-1).astype(float)
    n0 = y.shape[-1] - n1
    with np.errstate(divide="ignore", invalid="ignore"):
        a = ((ranks * y).sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), a, math.nan)


@dataclass
class AurocResult:
    """Per-class AUROC ``(C,)`` with CI bounds ``(C,)``, and the macro mean with its CI."""

    per_class: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    macro: float
    macro_ci: tuple[float, float]
    n_images: int
    n_boot: int
    seed: int


def _percentile_ci(x: np.ndarray, alpha: float) -> tuple[float, float]:
    x = x[~np.isnan(x)]
    if not x.size:
        return math.nan, math.nan
    lo, hi = np.percentile(x, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``int (n_boot, n)`` image indices drawn with replacement from a seeded generator."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_auroc(y_true: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05) -> AurocResult:
    """AUROC per class and macro (mean over defined classes) with percentile bootstrap CIs over images.

    ``y_true`` and ``scores``: ``(N, C)``. Images are resampled together for all classes.
    """
    y_true, scores = np.asarray(y_true, dtype=float), np.asarray(scores, dtype=float)
    if y_true.shape != scores.shape or y_true.ndim != 2:
        raise ValueError(f"y_true {y_true.shape} and scores {scores.shape} must both be (N, C)")
    point = auroc(y_true, scores)
    boots = macro_auroc_replicates(y_true, scores, bootstrap_indices(len(y_true), n_boot, seed))
    per_boot, macro_boot = boots
    cis = [_percentile_ci(per_boot[:, c], alpha) if not math.isnan(point[c]) else (math.nan, math.nan)
           for c in range(y_true.shape[1])]
    defined = point[~np.isnan(point)]
    macro = float(defined.mean()) if defined.size else math.nan
    return AurocResult(per_class=point, ci_low=np.array([c[0] for c in cis]), ci_high=np.array([c[1] for c in cis]),
                       macro=macro, macro_ci=_percentile_ci(macro_boot, alpha) if defined.size else (math.nan, math.nan),
                       n_images=len(y_true), n_boot=n_boot, seed=seed)


def macro_auroc_replicates(y_true: np.ndarray, scores: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class ``(R, C)`` and macro ``(R,)`` AUROC of resampled image sets ``idx (R, N)``.

    The macro mean of a replicate is over the classes defined on the full set; NaN if one of them
    is single-valued in that replicate.
    """
    per = np.stack([auroc_ranks(y_true[idx, c], scores[idx, c]) for c in range(y_true.shape[1])], axis=1)
    defined = np.array([0 < y_true[:, c].sum() < len(y_true) for c in range(y_true.shape[1])])
    macro = per[:, defined].mean(axis=1) if defined.any() else np.full(len(idx), math.nan)
    return per, macro


def _f(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def classification_summary(res: AurocResult, class_names: Sequence[str]) -> dict[str, Any]:
    """JSON-ready AUROC metrics; undefined values are ``None``."""
    return {
        "macro_AUROC": _f(res.macro),
        "macro_AUROC_CI95": [_f(res.macro_ci[0]), _f(res.macro_ci[1])],
        "per_class": {n: {"AUROC": _f(res.per_class[k]), "CI95": [_f(res.ci_low[k]), _f(res.ci_high[k])]}
                      for k, n in enumerate(class_names)},
        "n_images": res.n_images, "n_boot": res.n_boot, "seed": res.seed,
        "undefined_classes": [n for k, n in enumerate(class_names) if math.isnan(res.per_class[k])],
    }
