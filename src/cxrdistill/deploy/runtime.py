"""Run an exported ``model.onnx`` with ONNX Runtime and numpy only (no torch).

An ONNX export folder holds ``model.onnx`` (backbone + heads), ``deploy.json`` (kind, class names,
input size, output stride, default thresholds) and, for detectors, ``anchors.npy`` ``(A, 4)``::

    from cxrdistill.deploy.runtime import OnnxModel
    model = OnnxModel("export_dir")
    dets = model.predict_file("chest.dcm")     # boxes in original pixels, class names, scores

Images are read like training does (``cxrdistill.data.io.read_image``: [0, 1] grey) and resized
to ``image_size`` squared with Pillow's anti-aliased bilinear filter (training uses torch's; the
two agree to about 1e-3 grey level).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cxrdistill.deploy.postprocess import heatmap_detections, retinanet_detections

DEPLOY_FORMAT = "cxrdistill-onnx"

__all__ = ["OnnxModel", "resize_gray", "DEPLOY_FORMAT"]


def resize_gray(pixels: np.ndarray, size: int) -> np.ndarray:
    """``float32 (H, W)`` in [0, 1] -> ``float32 (size, size)`` (Pillow bilinear, anti-aliased)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    return np.clip(np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32), 0.0, 1.0)


class OnnxModel:
    """An ONNX export folder, run on the CPU with ONNX Runtime."""

    def __init__(self, folder: str | Path) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        self.meta: dict[str, Any] = json.loads((self.folder / "deploy.json").read_text())
        if self.meta.get("format") != DEPLOY_FORMAT:
            raise ValueError(f"{self.folder}: deploy.json is not a {DEPLOY_FORMAT} description")
        self.kind: str = self.meta["kind"]
        self.class_names: list[str] = list(self.meta["class_names"])
        self.image_size: int = int(self.meta["image_size"])
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.anchors = np.load(self.folder / "anchors.npy") if self.kind == "detector" else None

    def raw(self, images: np.ndarray) -> list[np.ndarray]:
        """Graph outputs for ``images (B, 1, S, S)`` float32 in [0, 1]: detector ``[cls_logits (B, A, C),
        box_deltas (B, A, 4)]``, heat map ``[probs (B, C, h, w)]``, classifier ``[probs (B, C)]``."""
        return self.session.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})

    def detect(self, images: np.ndarray, score_thresh: float | None = None,
               box_threshold: float | None = None) -> list[dict[str, np.ndarray]]:
        """Detections per image in network-input pixels: ``{"boxes" (K, 4) xyxy, "scores", "labels"}``."""
        settings = self.meta.get("postprocess", {})
        outputs = self.raw(images)
        if self.kind == "detector":
            thresh = settings.get("score_thresh", 0.05) if score_thresh is None else score_thresh
            return [retinanet_detections(c, d, self.anchors, (self.image_size, self.image_size), thresh,
                                         settings.get("nms_thresh", 0.5), settings.get("max_detections", 100),
                                         settings.get("topk_candidates", 1000))
                    for c, d in zip(*outputs)]
        if self.kind == "heatmap":
            thresh = settings.get("box_threshold", 0.5) if box_threshold is None else box_threshold
            return [heatmap_detections(p, thresh, int(self.meta["output_stride"])) for p in outputs[0]]
        raise ValueError("a classifier has no boxes; use image_scores()")

    def image_scores(self, images: np.ndarray) -> np.ndarray:
        """``(B, C)`` image-level scores: classifier probabilities, map maxima, or the max box score."""
        if self.kind == "classifier":
            return self.raw(images)[0][:, : len(self.class_names)]
        if self.kind == "heatmap":
            probs = self.raw(images)[0]
            return probs.reshape(probs.shape[0], probs.shape[1], -1).max(-1)
        out = np.zeros((len(images), len(self.class_names)), dtype=np.float32)
        for b, det in enumerate(self.detect(images)):
            for label, score in zip(det["labels"], det["scores"]):
                out[b, label] = max(out[b, label], score)
        return out

    def predict_file(self, path: str | Path, score_thresh: float | None = None) -> list[dict[str, Any]]:
        """Boxes of one PNG/JPEG/DICOM file in its original pixels: ``[{"class", "bbox" xywh, "score"}]``."""
        from cxrdistill.data.io import read_image

        pixels = read_image(path)
        height, width = pixels.shape
        image = resize_gray(pixels, self.image_size)[None, None]
        det = self.detect(image, score_thresh)[0]
        scale = np.array([width, height, width, height], dtype=np.float64) / self.image_size
        rows = []
        for box, score, label in zip(det["boxes"] * scale, det["scores"], det["labels"]):
            x0, y0, x1, y1 = (float(v) for v in box)
            rows.append({"class": self.class_names[int(label)], "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "score": float(score)})
        return rows
