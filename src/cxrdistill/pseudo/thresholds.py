"""Confidence thresholds on detections, and detections turned into detector targets.

Detections follow docs/architecture.md: one dict per image with ``"boxes"`` (K, 4) xyxy float,
``"scores"`` (K,) float and ``"labels"`` (K,) long class indices. Extra per-box entries (a
tensor whose first dimension is K, e.g. SA-NMS's ``"source"``) are filtered along with the boxes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from cxrdistill.errors import CxrDistillError

Detections = Mapping[str, Tensor]


def check_detections(dets: Sequence[Detections], name: str = "detections", scores: bool = True) -> None:
    """Raise :class:`CxrDistillError` naming the image (list position) whose detections are malformed.

    Checks presence of ``boxes``/``labels`` (and ``scores`` when ``scores``), shapes (K, 4), (K,),
    and that labels are non-negative.
    """
    keys = ("boxes", "labels", "scores") if scores else ("boxes", "labels")
    for i, d in enumerate(dets):
        missing = [k for k in keys if k not in d]
        if missing:
            raise CxrDistillError(f"{name}[{i}]: missing {missing}; has {sorted(d)}")
        boxes, labels = d["boxes"], d["labels"]
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise CxrDistillError(f"{name}[{i}]: boxes must be (K, 4) xyxy, got {tuple(boxes.shape)}")
        k = boxes.shape[0]
        for key in keys[1:]:
            if tuple(d[key].shape) != (k,):
                raise CxrDistillError(f"{name}[{i}]: {key} must be ({k},) like boxes, got {tuple(d[key].shape)}")
        if k and int(labels.min()) < 0:
            raise CxrDistillError(f"{name}[{i}]: negative class index {int(labels.min())}")


def select_boxes(det: Detections, keep: Tensor) -> dict[str, Tensor]:
    """Index every per-box entry of one image's detections by ``keep`` (bool mask or indices)."""
    k = det["boxes"].shape[0]
    return {key: (v[keep] if v.ndim >= 1 and v.shape[0] == k else v) for key, v in det.items()}


def _per_box_threshold(labels: Tensor, score_thresh: float | Tensor, where: str) -> Tensor | float:
    if not isinstance(score_thresh, Tensor) or score_thresh.ndim == 0:
        return float(score_thresh)
    if score_thresh.ndim != 1:
        raise ValueError(f"score_thresh must be a float or a (C,) tensor, got shape {tuple(score_thresh.shape)}")
    if labels.numel() and int(labels.max()) >= score_thresh.shape[0]:
        raise CxrDistillError(
            f"{where}: class index {int(labels.max())} has no threshold "
            f"(score_thresh has {score_thresh.shape[0]} classes)"
        )
    return score_thresh.to(labels.device)[labels]


def filter_detections(dets: Sequence[Detections], score_thresh: float | Tensor) -> list[dict[str, Tensor]]:
    """Keep the boxes whose score is at least the threshold of their class.

    Args:
        dets: per-image detections (see module docstring).
        score_thresh: one threshold for all classes (STAC keeps teacher boxes with score >= 0.9),
            or a (C,) tensor of per-class thresholds indexed by class index.

    Returns:
        New per-image dicts with the same keys, holding only the kept boxes.
    """
    check_detections(dets)
    out = []
    for i, d in enumerate(dets):
        thresh = _per_box_threshold(d["labels"], score_thresh, f"detections[{i}]")
        out.append(select_boxes(d, d["scores"] >= thresh))
    return out


def detections_to_targets(dets: Sequence[Detections], soft: bool) -> list[dict[str, Tensor]]:
    """Turn (already filtered) detections into detector targets.

    Returns per image ``{"boxes": (K, 4) float32, "labels": (K,) long}``; with ``soft=True`` also
    ``"scores": (K,) float32``, which the detector loss uses as the matched anchor's target for
    that class instead of 1 (docs/architecture.md, "Detector targets").
    """
    check_detections(dets, scores=soft)
    out = []
    for d in dets:
        target = {"boxes": d["boxes"].detach().float(), "labels": d["labels"].long()}
        if soft:
            target["scores"] = d["scores"].detach().float()
        out.append(target)
    return out
