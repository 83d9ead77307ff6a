"""CAM weakly-supervised localisation (Zhou et al., CVPR 2016): boxes from an image classifier's
class activation maps — the weak baseline of CEIRD's detection table.

1. Train the image classifier on the image labels of D_B ∪ D_W (masked BCE)     stage ``classifier``
2. For each test image and class: the CAM (`ImageClassifier.class_activation_maps`), upsampled
   bilinearly to the image, min-max normalised; the connected regions above ``threshold`` of its
   maximum become boxes (Zhou et al.: 20 % of the max; CXR practice often 0.5), each scored by the
   class probability times the region's peak (1 for the region holding the maximum).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage
from torch import Tensor

from cxrdistill.config import RunConfig
from cxrdistill.data.study import StudyData
from cxrdistill.engine.context import RunContext
from cxrdistill.eval.runs import batches, evaluate_detections
from cxrdistill.methods.kit import Augment, build_classifier_model, evaluate_final, train_classifier
from cxrdistill.methods.registry import register_method
from cxrdistill.models.classifier import ImageClassifier


class CamParams(BaseModel):
    """`method.params` of ``cam``."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.2, gt=0.0, lt=1.0)
    """Region threshold as a fraction of the CAM's range (Zhou et al.: 0.2)."""
    max_boxes_per_class: int = Field(3, ge=1)
    augment: Augment = "flip"
    train_split: str = "train"
    eval_split: str = "test"
    n_boot: int = Field(1000, ge=0)


def cam_boxes(cams: Tensor, probs: Tensor, threshold: float, max_boxes: int = 3) -> dict[str, Tensor]:
    """Boxes of one image from its CAMs ``(C, H, W)`` (image resolution) and probabilities ``(C,)``.

    Each class map is min-max normalised; connected regions ``> threshold`` become xyxy pixel boxes
    (a region covering pixels ``x0..x1`` gives ``[x0, y0, x1 + 1, y1 + 1]``), scored
    ``probs[c] · region peak``; at most ``max_boxes`` per class, best first.
    """
    boxes, scores, labels = [], [], []
    for c, cam in enumerate(cams.float().cpu().numpy()):
        low, high = float(cam.min()), float(cam.max())
        if not np.isfinite(high) or high - low <= 1e-12:
            continue
        norm = (cam - low) / (high - low)
        regions, n = ndimage.label(norm > threshold)
        found = []
        for k, sl in enumerate(ndimage.find_objects(regions), start=1):
            ys, xs = sl
            peak = float(norm[sl][regions[sl] == k].max())
            found.append((peak, [xs.start, ys.start, xs.stop, ys.stop]))
        for peak, box in sorted(found, key=lambda f: -f[0])[:max_boxes]:
            boxes.append(box)
            scores.append(float(probs[c]) * peak)
            labels.append(c)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.long)}


@torch.no_grad()
def predict_cam_detections(model: ImageClassifier, dataset: Any, threshold: float, max_boxes: int
                           ) -> tuple[dict[int, dict[str, Tensor]], np.ndarray]:
    """CAM boxes per image id (cache pixels) and the image probabilities ``(N, C)`` in dataset order."""
    model.eval()
    device = next(model.parameters()).device
    dets, probs_all = {}, []
    for batch in batches(dataset):
        images = batch["image"].to(device)
        cams = F.interpolate(model.class_activation_maps(images), size=images.shape[-2:], mode="bilinear",
                             align_corners=False)
        probs = torch.sigmoid(model(images)).cpu()
        probs_all.append(probs.numpy())
        for image_id, cam, p in zip(batch["image_id"].tolist(), cams, probs):
            dets[image_id] = cam_boxes(cam, p, threshold, max_boxes)
    return dets, np.concatenate(probs_all) if probs_all else np.zeros((0, dataset.manifest.num_classes))


@register_method("cam", CamParams)
def run(cfg: RunConfig, params: CamParams, ctx: RunContext) -> dict[str, float]:
    """Image classifier on image labels → boxes from thresholded class activation maps."""
    data = StudyData.from_config(cfg.data)
    model = build_classifier_model(cfg.model, data.num_classes)
    train_classifier(ctx, "classifier", model, data.dataset(params.train_split), params.augment)
    held_out = data.dataset(params.eval_split)

    def evaluate() -> dict[str, Any]:
        dets, probs = predict_cam_detections(model, held_out, params.threshold, params.max_boxes_per_class)
        return evaluate_detections(dets, held_out, ctx.run_dir.eval, split=params.eval_split, n_boot=params.n_boot,
                                   image_scores=probs)

    return evaluate_final(ctx, evaluate, "CAM weak localisation")


__all__ = ["CamParams", "cam_boxes", "predict_cam_detections", "run"]
