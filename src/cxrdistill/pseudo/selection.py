"""Which teacher boxes become pseudo-labels: per-class score thresholds, chosen three ways.

``pseudo.selection`` (a recipe's ``method.params.pseudo.selection``):

- ``fixed``: the paper's τ for every class (the default).
- ``precision@P``: per class, the lowest score threshold at which the teacher's boxes on the
  *validation* split reach precision ``P`` at IoU 0.5 (:func:`precision_thresholds`). A class with
  fewer than ``min_val_boxes`` validation truth boxes falls back to its top-κ threshold; a class
  whose precision never reaches ``P`` keeps no box (and the collapse guard says so).
- ``topk_per_class``: the class-balanced top-κ of Martins & Silva applied to boxes: per class, the
  κ_c highest-scoring boxes over the unlabeled set, κ_c = (boxes of class c per labeled image) ×
  (unlabeled images) (:func:`expected_counts`, :func:`topk_thresholds`).

Every choice ends as a ``(C,)`` threshold tensor that `pseudo.thresholds.filter_detections`
applies, plus a per-class record (threshold, how it was chosen, boxes kept) written to the run.
Detections are per-image dicts ``{"boxes": (K, 4) xyxy, "scores": (K,), "labels": (K,)}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from cxrdistill.errors import CxrDistillError

_PRECISION = re.compile(r"^precision@(0(\.\d+)?|1(\.0*)?)$")
NEVER = math.inf
"""Threshold of a class that keeps no box."""


class PseudoSelection(BaseModel):
    """``method.params.pseudo`` of every detection recipe."""

    model_config = ConfigDict(extra="forbid")

    selection: str = "fixed"
    """``fixed`` (the recipe's τ), ``precision@P`` (e.g. ``precision@0.8``) or ``topk_per_class``."""
    iou: float = Field(0.5, gt=0.0, lt=1.0)
    """IoU at which a validation box counts as a true positive (precision@P)."""
    min_val_boxes: int = Field(5, ge=1)
    """precision@P: a class with fewer validation truth boxes falls back to its top-κ threshold."""
    val_split: str = "val"
    on_collapse: Literal["warn", "stop"] = "warn"
    """When the pseudo-labels collapse (`pseudo.collapse`): warn and go on, or stop with an error."""
    min_image_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """Collapse floor: fewer than this fraction of unlabeled images with any pseudo-box."""

    @field_validator("selection")
    @classmethod
    def _known(cls, value: str) -> str:
        if value in ("fixed", "topk_per_class") or _PRECISION.match(value):
            return value
        raise ValueError(f"pseudo.selection {value!r}: use 'fixed', 'precision@P' (0 < P <= 1, e.g. "
                         "precision@0.8) or 'topk_per_class'")

    @property
    def precision(self) -> float | None:
        return float(self.selection.split("@", 1)[1]) if self.selection.startswith("precision@") else None

    @property
    def needs_validation(self) -> bool:
        return self.precision is not None


@dataclass
class Selection:
    """Per-class thresholds ``(C,)`` and what chose each (``records[class] = {...}``)."""

    thresholds: Tensor
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    method: str = "fixed"

    def to_dict(self) -> dict[str, Any]:
        return {"selection": self.method,
                "thresholds": {n: _j(r["threshold"]) for n, r in self.records.items()},
                "per_class": {n: {k: _j(v) for k, v in r.items()} for n, r in self.records.items()}}


def _j(value: Any) -> Any:
    return None if isinstance(value, float) and (math.isinf(value) or math.isnan(value)) else value


# ----------------------------------------------------------------------------- matching


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """``(N, M)`` IoU of xyxy boxes ``a (N, 4)`` and ``b (M, 4)``."""
    if not len(a) or not len(b):
        return torch.zeros(len(a), len(b))
    a, b = a.double(), b.double()
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return (inter / (area_a[:, None] + area_b[None] - inter).clamp(min=1e-12)).float()


def true_positive_flags(dets: Sequence[Mapping[str, Tensor]], truth: Sequence[Mapping[str, Tensor]],
                        iou: float = 0.5) -> list[Tensor]:
    """Per image, ``(K,)`` bool: detection k matches a same-class truth box at IoU >= ``iou``
    (greedy by score, each truth box matched at most once, like COCO)."""
    if len(dets) != len(truth):
        raise CxrDistillError(f"true_positive_flags: {len(dets)} detection lists for {len(truth)} truth lists")
    out = []
    for d, t in zip(dets, truth):
        flags = torch.zeros(len(d["scores"]), dtype=torch.bool)
        if len(d["scores"]) and len(t["labels"]):
            order = torch.argsort(d["scores"].float(), descending=True, stable=True)
            ious = box_iou(d["boxes"].float(), t["boxes"].float())
            used = torch.zeros(len(t["labels"]), dtype=torch.bool)
            for k in order.tolist():
                same = (t["labels"].long() == int(d["labels"][k])) & ~used
                if not same.any():
                    continue
                cand = torch.where(same, ious[k], torch.full_like(ious[k], -1.0))
                j = int(cand.argmax())
                if float(cand[j]) >= iou:
                    flags[k] = True
                    used[j] = True
        out.append(flags)
    return out


# ----------------------------------------------------------------------------- the three choices


def fixed_thresholds(tau: float, class_names: Sequence[str]) -> Selection:
    """The paper's τ for every class."""
    return Selection(torch.full((len(class_names),), float(tau)),
                     {n: {"threshold": float(tau), "source": "fixed"} for n in class_names}, "fixed")


def expected_counts(labeled_truth: Sequence[Mapping[str, Tensor]], n_unlabeled: int, num_classes: int) -> Tensor:
    """κ ``(C,)`` long: boxes of each class per labeled image × the number of unlabeled images
    (at least 1 for a class that occurs in the labeled set, 0 for one that does not)."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for t in labeled_truth:
        counts += torch.bincount(t["labels"].long(), minlength=num_classes)[:num_classes].double()
    per_image = counts / max(len(labeled_truth), 1)
    kappa = torch.round(per_image * n_unlabeled).long()
    return torch.where(counts > 0, kappa.clamp(min=1), torch.zeros_like(kappa))


def topk_thresholds(dets: Sequence[Mapping[str, Tensor]], kappa: Tensor, class_names: Sequence[str]) -> Selection:
    """Per class c, the score of its κ_c-th best box over ``dets`` (all boxes when fewer; none when κ_c = 0)."""
    c = len(class_names)
    scores = [torch.cat([d["scores"][d["labels"].long() == k].float() for d in dets]) if dets else torch.zeros(0)
              for k in range(c)]
    thresholds = torch.full((c,), NEVER)
    records = {}
    for k, name in enumerate(class_names):
        s = torch.sort(scores[k], descending=True).values
        kk = int(kappa[k])
        if kk > 0 and len(s):
            thresholds[k] = float(s[min(kk, len(s)) - 1])
        records[name] = {"threshold": float(thresholds[k]), "source": "topk", "kappa": kk, "candidates": len(s)}
    return Selection(thresholds, records, "topk_per_class")


def precision_threshold(scores: Tensor, tp: Tensor, precision: float) -> float:
    """The lowest threshold s (a score in ``scores``) such that the boxes scoring >= s have
    precision >= ``precision``; :data:`NEVER` when no such s exists."""
    if not len(scores):
        return NEVER
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, hit = scores.double()[order], tp.double()[order]
    prec = torch.cumsum(hit, 0) / torch.arange(1, len(s) + 1, dtype=torch.float64)
    # only cut between distinct scores: a threshold keeps every box tied at it
    last_of_tie = torch.ones(len(s), dtype=torch.bool)
    last_of_tie[:-1] = s[1:] != s[:-1]
    ok = (prec >= precision - 1e-12) & last_of_tie
    if not ok.any():
        return NEVER
    return float(s[int(torch.nonzero(ok).max())])


def precision_thresholds(val_dets: Sequence[Mapping[str, Tensor]], val_truth: Sequence[Mapping[str, Tensor]],
                         precision: float, class_names: Sequence[str], *, iou: float = 0.5, min_val_boxes: int = 5,
                         fallback: Selection | None = None) -> Selection:
    """Per-class thresholds at which the teacher's validation boxes reach ``precision`` at ``iou``.

    A class with fewer than ``min_val_boxes`` validation truth boxes takes ``fallback``'s threshold
    (the top-κ one; :data:`NEVER` without a fallback).
    """
    flags = true_positive_flags(val_dets, val_truth, iou)
    c = len(class_names)
    thresholds = torch.full((c,), NEVER)
    records = {}
    for k, name in enumerate(class_names):
        n_truth = sum(int((t["labels"].long() == k).sum()) for t in val_truth)
        mask = [d["labels"].long() == k for d in val_dets]
        scores = torch.cat([d["scores"][m].float() for d, m in zip(val_dets, mask)]) if val_dets else torch.zeros(0)
        tp = torch.cat([f[m] for f, m in zip(flags, mask)]) if val_dets else torch.zeros(0, dtype=torch.bool)
        record: dict[str, Any] = {"val_truth_boxes": n_truth, "val_detections": len(scores)}
        if n_truth < min_val_boxes:
            t = float(fallback.thresholds[k]) if fallback is not None else NEVER
            record.update(source="topk_fallback", threshold=t)
        else:
            t = precision_threshold(scores, tp, precision)
            kept = scores >= t
            record.update(source="precision" if math.isfinite(t) else "precision_unreachable", threshold=t,
                          val_precision=float(tp[kept].float().mean()) if kept.any() else None,
                          val_recall=float(tp[kept].sum()) / n_truth)
        thresholds[k] = t
        records[name] = record
    return Selection(thresholds, records, f"precision@{precision:g}")


def kept_per_class(dets: Sequence[Mapping[str, Tensor]], thresholds: Tensor, class_names: Sequence[str]) -> dict[str, int]:
    """Boxes per class that pass ``thresholds (C,)``."""
    out = dict.fromkeys(class_names, 0)
    for d in dets:
        labels = d["labels"].long()
        keep = d["scores"].float() >= thresholds[labels] if len(labels) else torch.zeros(0, dtype=torch.bool)
        for k in labels[keep].tolist():
            out[class_names[k]] += 1
    return out


__all__ = ["NEVER", "PseudoSelection", "Selection", "box_iou", "expected_counts", "fixed_thresholds",
           "kept_per_class", "precision_threshold", "precision_thresholds", "topk_thresholds",
           "true_positive_flags"]
