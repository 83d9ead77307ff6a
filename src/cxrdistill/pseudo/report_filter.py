"""Cross-modal pseudo-label refinement of CEIRD (Sun et al., Sec. 2).

- RPDLR, Eq. (3): keep only the pseudo boxes whose class the paired report is classified as
  having, {(y_v, B_v)} = {(y_cv_j, B_cv_j) | y_cv_j ∈ {ŷ}}.
- APCLR: "we retain only the pseudo labels {y_pr_j | y_pr_j ∈ {ŷ}}, by excluding the
  report-classified abnormalities not detected in the paired CXR". The pseudo-labels are the set
  of classes the teacher report model finds; retaining a subset of that set means a positive
  whose class the vision model does not detect becomes a negative (0). Negatives are never
  changed: a detection does not add a report label. With soft report pseudo-labels the same rule
  is ``refined = report_pseudo · detected``.

Classes are shared class indices. For a report class the detector cannot see (no box class),
pass ``detected`` True for it so APCLR leaves it alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cxrdistill.errors import CxrDistillError
from cxrdistill.pseudo.thresholds import Detections, check_detections, select_boxes


def _presence(present: Tensor, thresh: float | None, n: int) -> Tensor:
    if present.ndim != 2 or present.shape[0] != n:
        raise ValueError(f"present must be (N={n}, C), got shape {tuple(present.shape)}")
    if present.dtype == torch.bool:
        return present
    if thresh is None:
        raise ValueError("present holds probabilities: pass thresh (class present when prob >= thresh)")
    return present >= thresh


def filter_boxes_by_image_labels(
    dets: Sequence[Detections], present: Tensor, thresh: float | None = None
) -> list[dict[str, Tensor]]:
    """RPDLR (CEIRD Eq. 3): drop the boxes whose class is absent from the image's report prediction.

    Args:
        dets: N per-image detections / pseudo-labels (boxes, scores, labels; extra per-box
            entries such as ``"source"`` are kept in step).
        present: (N, C) bool, the classes found in each paired report, or (N, C) report
            probabilities together with ``thresh``.
        thresh: a class is present when its probability is >= thresh (probabilities only).

    Returns:
        N dicts with the same keys, holding only boxes whose class is present.
    """
    check_detections(dets, scores=False)
    present = _presence(present, thresh, len(dets))
    out = []
    for i, d in enumerate(dets):
        labels = d["labels"].long()
        if labels.numel() and int(labels.max()) >= present.shape[1]:
            raise CxrDistillError(
                f"detections[{i}]: class index {int(labels.max())} outside the report's {present.shape[1]} classes"
            )
        out.append(select_boxes(d, present[i].to(labels.device)[labels]))
    return out


def filter_labels_by_detections(report_pseudo: Tensor, detected: Tensor) -> Tensor:
    """APCLR: keep only the report pseudo-labels whose class the vision model detects.

    Args:
        report_pseudo: (N, C) teacher report-model pseudo-labels, multi-hot 0/1 or probabilities.
        detected: (N, C) bool, classes detected in the paired image
            (see :func:`detections_to_presence`).

    Returns:
        (N, C) refined pseudo-labels: positives of undetected classes set to 0, the rest unchanged.
    """
    if report_pseudo.shape != detected.shape or report_pseudo.ndim != 2:
        raise ValueError(
            f"report_pseudo {tuple(report_pseudo.shape)} and detected {tuple(detected.shape)} must both be (N, C)"
        )
    if detected.dtype != torch.bool:
        raise ValueError(f"detected must be bool, got {detected.dtype}")
    return report_pseudo * detected.to(report_pseudo.dtype)


def detections_to_presence(dets: Sequence[Detections], num_classes: int, score_thresh: float) -> Tensor:
    """(N, C) bool: image i shows class c when it has a box of class c scoring >= score_thresh."""
    check_detections(dets)
    device = dets[0]["labels"].device if dets else torch.device("cpu")
    present = torch.zeros(len(dets), num_classes, dtype=torch.bool, device=device)
    for i, d in enumerate(dets):
        labels = d["labels"][d["scores"] >= score_thresh].long()
        if labels.numel() and int(labels.max()) >= num_classes:
            raise CxrDistillError(f"detections[{i}]: class index {int(labels.max())} >= num_classes={num_classes}")
        present[i, labels] = True
    return present
