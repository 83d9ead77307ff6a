"""All metrics of one set of predictions on one split, as a JSON-ready dict.

`evaluate_predictions` works on in-memory rows (recipes call it after predicting);
`evaluate_files` reads the files `cxrdistill evaluate` is given and calls it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdistill.errors import CxrDistillError
from cxrdistill.eval.classification import bootstrap_auroc, classification_summary
from cxrdistill.eval.detection import CocoParams, coco_evaluate, detection_summary, pycocotools_evaluate
from cxrdistill.eval.froc import (
    AALS_FP_RATIOS,
    FROC_FP_RATES,
    FrocResult,
    ModifiedFroc,
    lesion_froc_per_class,
    modified_froc_from_boxes,
)
from cxrdistill.eval.predictions import (
    GroundTruth,
    image_labels,
    image_scores_from_boxes,
    load_ground_truth,
    load_image_scores,
    load_predictions,
)

__all__ = ["evaluate_predictions", "evaluate_files", "modified_froc_from_heatmaps", "froc_block"]


def _heatmap_path(folder: Path, image_id: int, category_id: int, n_classes: int) -> Path | None:
    per_class = folder / f"{image_id}_{category_id}.png"
    if per_class.exists():
        return per_class
    single = folder / f"{image_id}.png"
    return single if n_classes == 1 and single.exists() else None


def modified_froc_from_heatmaps(gt: GroundTruth, folder: Path, bins: int = 1000) -> dict[str, FrocResult]:
    """AALS modified FROC per class from probability-map PNGs.

    ``folder/<image_id>_<category_id>.png`` (or ``<image_id>.png`` with a single class), 8- or
    16-bit grey scaled to [0, 1]; GT boxes are scaled from the image size to the map size. Every
    image of the split needs a map: a missing one raises :class:`CxrDistillError` naming it.
    """
    from PIL import Image

    sizes = {int(im["id"]): (im.get("width"), im.get("height")) for im in gt.coco["images"]}
    out = {}
    for name, cid in zip(gt.class_names, gt.category_ids):
        acc = ModifiedFroc(bins=bins, ratios=AALS_FP_RATIOS)
        boxes: dict[int, list] = {}
        for a in gt.coco["annotations"]:
            if a["category_id"] == cid and not a.get("iscrowd", 0):
                boxes.setdefault(a["image_id"], []).append(a["bbox"])
        for iid in gt.image_ids:
            path = _heatmap_path(folder, iid, cid, len(gt.category_ids))
            if path is None:
                raise CxrDistillError(f"{folder}: no heat map for image {iid}, class {name!r} "
                                      f"(expected {iid}_{cid}.png)")
            with Image.open(path) as im:
                arr = np.asarray(im)
            m = arr.astype(np.float64) / (65535.0 if arr.dtype == np.uint16 else 255.0)
            w, h = sizes[iid]
            if not w or not h:
                raise CxrDistillError(f"image {iid}: width/height missing in the manifest; needed to scale boxes")
            sx, sy = m.shape[1] / float(w), m.shape[0] / float(h)
            b = np.array(boxes.get(iid, []), dtype=float).reshape(-1, 4)
            xyxy = np.stack([b[:, 0] * sx, b[:, 1] * sy, (b[:, 0] + b[:, 2]) * sx, (b[:, 1] + b[:, 3]) * sy], 1)
            acc.add(m, xyxy)
        out[name] = acc.result()
    return out


def froc_block(results: dict[str, FrocResult], **extra: Any) -> dict[str, Any]:
    scores = [r.score for r in results.values() if not math.isnan(r.score)]
    return {**extra, "mean_score": float(np.mean(scores)) if scores else None,
            "per_class": {k: v.to_dict() for k, v in results.items()}}


def evaluate_predictions(
    gt: GroundTruth,
    rows: Sequence[dict[str, Any]],
    scores: np.ndarray | None = None,
    *,
    iou: Sequence[float] = (0.25, 0.5, 0.75),
    froc_criterion: str = "center",
    froc_iou: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    backend: str = "fast",
    modified_froc: bool = False,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """All metrics of COCO result `rows` (and image `scores (N_images, C)`, else the max box score).

    ``detection``: COCO AP (``backend`` "fast" numpy or "pycocotools"); ``froc``: lesion FROC per
    class; ``classification``: AUROC with bootstrap CIs. ``modified_froc``: the AALS pixel FROC of
    the boxes (drawn as score maps). Undefined values are ``None``.
    """
    params = CocoParams(iou_thresholds=tuple(float(t) for t in iou))
    evaluator = {"fast": coco_evaluate, "pycocotools": pycocotools_evaluate}.get(backend)
    if evaluator is None:
        raise CxrDistillError(f"unknown backend {backend!r}: use 'fast' or 'pycocotools'")
    rows = list(rows)
    det = detection_summary(evaluator(gt, rows, params), gt.class_names)
    froc = lesion_froc_per_class(gt, rows, criterion=froc_criterion, iou_threshold=froc_iou)
    y, mask = image_labels(gt)
    source = "image scores"
    if scores is None:
        scores, source = image_scores_from_boxes(rows, gt), "max box score per class"
    cls = classification_summary(bootstrap_auroc(y[mask], scores[mask], n_boot=n_boot, seed=seed), gt.class_names)
    cls["score_source"] = source
    notes = list(notes)
    if (~mask).any():
        notes.append(f"{int((~mask).sum())} image(s) with supervision 'none' left out of AUROC")
    result = {
        "split": gt.split,
        "n_images": len(gt.image_ids), "n_gt_boxes": len(gt.coco["annotations"]), "n_predictions": len(rows),
        "class_names": gt.class_names,
        "detection": det,
        "froc": froc_block(froc, criterion=froc_criterion, fp_rates=list(FROC_FP_RATES),
                           iou_threshold=froc_iou if froc_criterion == "iou" else None),
        "classification": cls,
        "notes": notes,
    }
    if modified_froc:
        result["modified_froc_boxes"] = froc_block(modified_froc_from_boxes(gt, rows), fp_ratios=list(AALS_FP_RATIOS))
    return result


def evaluate_files(
    manifest: Path,
    predictions: Path,
    image_scores: Path | None = None,
    split: str | None = "test",
    iou: Sequence[float] = (0.25, 0.5, 0.75),
    froc_criterion: str = "center",
    froc_iou: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    backend: str = "fast",
    heatmaps: Path | None = None,
    modified_froc: bool = False,
) -> dict[str, Any]:
    """`evaluate_predictions` on files; ``heatmaps``: the AALS pixel FROC of probability-map PNGs."""
    gt = load_ground_truth(manifest, split=split)
    preds = load_predictions(predictions, gt)
    scores = load_image_scores(image_scores, gt) if image_scores is not None else None
    result = evaluate_predictions(gt, preds.rows, scores, iou=iou, froc_criterion=froc_criterion,
                                  froc_iou=froc_iou, n_boot=n_boot, seed=seed, backend=backend,
                                  modified_froc=modified_froc, notes=preds.notes)
    result = {"manifest": str(manifest), "predictions": str(predictions), **result}
    if image_scores is not None:
        result["classification"]["score_source"] = str(image_scores)
    if heatmaps is not None:
        result["modified_froc_heatmaps"] = froc_block(modified_froc_from_heatmaps(gt, heatmaps),
                                                      fp_ratios=list(AALS_FP_RATIOS), folder=str(heatmaps))
    return result
