"""Evaluate a trained model on a split of a study: predict, write the files, compute the metrics.

Every recipe ends here. Each `evaluate_*` function predicts the images of one split at the cache
resolution, converts boxes back to original pixels, writes ``out_dir/predictions.json`` (COCO
results), ``out_dir/image_scores.json`` and ``out_dir/metrics.json`` (what `cxrdistill report`
reads), and returns the metrics dict of `eval.metrics.evaluate_predictions`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cxrdistill.data.dataset import CXRDataset, collate
from cxrdistill.data.manifest import write_json_atomic
from cxrdistill.eval.classification import bootstrap_indices
from cxrdistill.eval.froc import AALS_FP_RATIOS, ModifiedFroc
from cxrdistill.eval.metrics import evaluate_predictions, froc_block
from cxrdistill.eval.predictions import GroundTruth, ground_truth_from_coco, image_scores_from_boxes

DEFAULT_IOUS: tuple[float, ...] = (0.25, 0.5, 0.75)
Detections = dict[str, Tensor]


def ground_truth_of(dataset: CXRDataset, split: str | None = None) -> GroundTruth:
    """COCO ground truth of exactly the images of `dataset` (all its boxes, whatever the supervision)."""
    coco = dataset.manifest.to_coco_dict()
    keep = {im.id for im in dataset.images}
    coco["images"] = [im for im in coco["images"] if im["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    for im in coco["images"]:
        im["split"] = split or "eval"
        im["supervision"] = "box"  # evaluation uses the full truth of these images
    return ground_truth_from_coco(coco, split=split or "eval")


def batches(dataset: CXRDataset, batch_size: int = 16, num_workers: int = 0) -> Iterator[dict[str, Any]]:
    """Collated batches in dataset order (no shuffling)."""
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                          num_workers=num_workers)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def predict_detections(model: nn.Module, dataset: CXRDataset, *, batch_size: int = 16,
                       score_thresh: float = 0.05, max_detections: int = 100,
                       topk_candidates: int = 1000) -> dict[int, Detections]:
    """Detections of a RetinaNet-like model (`.predict(images)`) per image id, cache pixels, on CPU."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    out: dict[int, Detections] = {}
    for batch in batches(dataset, batch_size):
        dets = model.predict(batch["image"].to(device), score_thresh=score_thresh,
                             max_detections=max_detections, topk_candidates=topk_candidates)
        for image_id, det in zip(batch["image_id"].tolist(), dets):
            out[image_id] = {k: v.cpu() for k, v in det.items()}
    model.train(was_training)
    return out


def detections_to_rows(dets: dict[int, Detections], dataset: CXRDataset) -> list[dict[str, Any]]:
    """COCO result rows in original pixels (`dets` are in cache pixels, labels are class indices)."""
    cat_ids = dataset.manifest.category_ids
    rows: list[dict[str, Any]] = []
    for rec in dataset.images:
        det = dets.get(rec.id)
        if det is None or not len(det["boxes"]):
            continue
        sx, sy = dataset.scale_of(rec)
        boxes = det["boxes"].double().numpy() / np.array([sx, sy, sx, sy])
        for (x0, y0, x1, y1), score, label in zip(boxes, det["scores"].tolist(), det["labels"].tolist()):
            rows.append({"image_id": rec.id, "category_id": cat_ids[int(label)],
                         "bbox": [round(float(x0), 2), round(float(y0), 2),
                                  round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                         "score": round(float(score), 5)})
    return rows


def image_score_rows(image_ids: Sequence[int], scores: np.ndarray, category_ids: Sequence[int]) -> list[dict]:
    """`image_scores.json` rows from `scores (N, C)`."""
    return [{"image_id": int(iid), "category_id": int(cid), "score": round(float(s), 6)}
            for iid, row in zip(image_ids, scores) for cid, s in zip(category_ids, row)]


def _aligned_scores(gt: GroundTruth, image_ids: Sequence[int], scores: np.ndarray) -> np.ndarray:
    index = {iid: i for i, iid in enumerate(image_ids)}
    return np.stack([scores[index[iid]] for iid in gt.image_ids])


def _finish(out_dir: Path | None, metrics: dict[str, Any], rows: list[dict] | None,
            score_rows: list[dict] | None) -> dict[str, Any]:
    if out_dir is not None:
        out_dir = Path(out_dir)
        if rows is not None:
            write_json_atomic(out_dir / "predictions.json", rows)
        if score_rows is not None:
            write_json_atomic(out_dir / "image_scores.json", score_rows)
        write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


def evaluate_detections(dets: dict[int, Detections], dataset: CXRDataset, out_dir: Path | None = None, *,
                        split: str | None = None, iou: Sequence[float] = DEFAULT_IOUS, n_boot: int = 1000,
                        seed: int = 0, image_scores: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of detections given in cache pixels (mAP at `iou`, FROC, AUROC from max box score)."""
    gt = ground_truth_of(dataset, split)
    rows = detections_to_rows(dets, dataset)
    ids = [rec.id for rec in dataset.images]
    scores = None if image_scores is None else _aligned_scores(gt, ids, image_scores)
    metrics = evaluate_predictions(gt, rows, scores, iou=iou, n_boot=n_boot, seed=seed)
    if image_scores is None:  # a detector's image score of a class: its best box (what AUROC used)
        score_rows = image_score_rows(gt.image_ids, image_scores_from_boxes(rows, gt), gt.category_ids)
    else:
        score_rows = image_score_rows(ids, image_scores, dataset.manifest.category_ids)
    return _finish(out_dir, metrics, rows, score_rows)


def evaluate_detector(model: nn.Module, dataset: CXRDataset, out_dir: Path | None = None, *,
                      split: str | None = None, iou: Sequence[float] = DEFAULT_IOUS, batch_size: int = 16,
                      n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Predict `dataset` with a detector and evaluate (see `evaluate_detections`)."""
    dets = predict_detections(model, dataset, batch_size=batch_size)
    return evaluate_detections(dets, dataset, out_dir, split=split, iou=iou, n_boot=n_boot, seed=seed)


@torch.no_grad()
def predict_image_scores(score_fn: Callable[[Tensor], Tensor], dataset: CXRDataset, *, device: torch.device,
                         batch_size: int = 16) -> tuple[list[int], np.ndarray]:
    """`score_fn(images (B,1,S,S)) -> probabilities (B, C)` over the dataset: (image ids, (N, C))."""
    ids: list[int] = []
    chunks: list[np.ndarray] = []
    for batch in batches(dataset, batch_size):
        chunks.append(score_fn(batch["image"].to(device)).float().cpu().numpy())
        ids += batch["image_id"].tolist()
    return ids, np.concatenate(chunks) if chunks else np.zeros((0, dataset.manifest.num_classes))


def evaluate_image_scores(image_ids: Sequence[int], scores: np.ndarray, dataset: CXRDataset,
                          out_dir: Path | None = None, *, split: str | None = None, n_boot: int = 1000,
                          seed: int = 0) -> dict[str, Any]:
    """AUROC (per class, macro, bootstrap CIs) of image scores `(N, C)`; no boxes are evaluated."""
    gt = ground_truth_of(dataset, split)
    metrics = evaluate_predictions(gt, [], _aligned_scores(gt, image_ids, scores), n_boot=n_boot, seed=seed)
    metrics.pop("detection", None)
    metrics.pop("froc", None)
    return _finish(out_dir, metrics, None, image_score_rows(image_ids, scores, dataset.manifest.category_ids))


def evaluate_classifier(model: nn.Module, dataset: CXRDataset, out_dir: Path | None = None, *,
                        split: str | None = None, batch_size: int = 16, n_boot: int = 1000, seed: int = 0,
                        score_fn: Callable[[Tensor], Tensor] | None = None) -> dict[str, Any]:
    """AUROC of an image classifier (`score_fn` defaults to sigmoid of the logits; pass a TTA here)."""
    was_training = model.training
    model.eval()
    fn = score_fn or (lambda x: torch.sigmoid(model(x)))
    ids, scores = predict_image_scores(fn, dataset, device=_device_of(model), batch_size=batch_size)
    model.train(was_training)
    return evaluate_image_scores(ids, scores, dataset, out_dir, split=split, n_boot=n_boot, seed=seed)


@torch.no_grad()
def evaluate_heatmap(model: nn.Module, dataset: CXRDataset, out_dir: Path | None = None, *,
                     split: str | None = None, iou: Sequence[float] = DEFAULT_IOUS, batch_size: int = 16,
                     box_threshold: float = 0.5, n_boot: int = 1000, seed: int = 0,
                     froc_boot: int = 0) -> dict[str, Any]:
    """A heat-map model: AUROC of the map maxima, the AALS modified FROC per class, and mAP of the
    boxes of connected regions above `box_threshold` (scored by their peak). ``froc_boot > 0``: a
    percentile-bootstrap CI of the modified FROC too (`modified_froc_ci`, ``modified_froc_heatmaps.bootstrap_CI95``;
    ``dataset`` then needs ``with_truth=True``)."""
    from cxrdistill.models.heatmap import maps_to_detections

    was_training = model.training
    model.eval()
    device = _device_of(model)
    names = dataset.manifest.class_names
    frocs = {name: ModifiedFroc(ratios=AALS_FP_RATIOS) for name in names}
    dets: dict[int, Detections] = {}
    ids: list[int] = []
    chunks: list[np.ndarray] = []
    stride = int(getattr(model, "output_stride", 1))
    for batch in batches(dataset, batch_size):
        probs = torch.sigmoid(model(batch["image"].to(device)).float()).cpu()  # (B, C, h, w)
        chunks.append(probs.flatten(2).amax(2).numpy())
        ids += batch["image_id"].tolist()
        for image_id, det in zip(batch["image_id"].tolist(), maps_to_detections(probs, box_threshold, stride)):
            dets[image_id] = det
        for b, image_id in enumerate(batch["image_id"].tolist()):
            boxes, labels = dataset.manifest.boxes_xyxy(image_id)
            rec = dataset.manifest.image(image_id)
            h, w = probs.shape[-2:]
            scale = np.array([w / rec.width, h / rec.height, w / rec.width, h / rec.height])
            for c, name in enumerate(names):
                frocs[name].add(probs[b, c].numpy(), boxes[labels == c] * scale)
    model.train(was_training)
    scores = np.concatenate(chunks) if chunks else np.zeros((0, len(names)))
    metrics = evaluate_detections(dets, dataset, None, split=split, iou=iou, n_boot=n_boot, seed=seed,
                                  image_scores=scores)
    metrics["modified_froc_heatmaps"] = froc_block({n: f.result() for n, f in frocs.items()},
                                                   fp_ratios=list(AALS_FP_RATIOS))
    if froc_boot:
        metrics["modified_froc_heatmaps"]["bootstrap_CI95"] = modified_froc_ci(
            predict_maps(model, dataset, batch_size), names, froc_boot)
    rows = detections_to_rows(dets, dataset)
    return _finish(out_dir, metrics, rows, image_score_rows(ids, scores, dataset.manifest.category_ids))


@torch.no_grad()
def predict_maps(model: torch.nn.Module, dataset: CXRDataset, batch_size: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image: probability maps ``(C, h, w)`` at the model's stride, truth boxes ``(N, 4)`` xyxy in
    map pixels and their class indices ``(N,)`` — what the modified FROC reads."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        probs = torch.sigmoid(model(batch["image"].to(device)).float()).cpu()
        scale = probs.shape[-1] / batch["image"].shape[-1]
        for b in range(len(probs)):
            out.append((probs[b].numpy(), batch["truth_boxes"][b].numpy() * scale, batch["truth_labels"][b].numpy()))
    model.train(was_training)
    return out


def modified_froc_ci(per_image: list[tuple[np.ndarray, np.ndarray, np.ndarray]], class_names: list[str],
                     n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Percentile-bootstrap 95 % CIs (images resampled) of the modified FROC per class and of its macro mean."""
    replicates = bootstrap_indices(len(per_image), n_boot, seed)
    per_class: dict[str, np.ndarray] = {}
    for c, name in enumerate(class_names):
        if not any((labels == c).any() for _, _, labels in per_image):
            continue  # no lesion of this class: its FROC is undefined
        values = []
        for order in replicates:
            acc = ModifiedFroc()
            for i in order:
                maps, boxes, labels = per_image[i]
                acc.add(maps[c], boxes[labels == c])
            values.append(acc.result().score)
        per_class[name] = np.array(values)
    macro = np.nanmean(np.stack(list(per_class.values())), axis=0) if per_class else np.zeros(0)
    return {"n_boot": n_boot, "seed": seed, "macro": _ci(macro),
            "per_class": {name: _ci(values) for name, values in per_class.items()}}


def _ci(values: np.ndarray) -> list[float | None]:
    values = values[~np.isnan(values)]
    if not values.size:
        return [None, None]
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Write a metrics dict as JSON, atomically."""
    write_json_atomic(Path(path), json.loads(json.dumps(metrics, default=float)))
