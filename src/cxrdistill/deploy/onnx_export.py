"""Export a trained model's network (backbone + heads) to ONNX; anchors and decode/NMS stay in numpy.

``export_onnx(model, meta, out_dir)`` writes ``model.onnx``, ``deploy.json`` and (detectors)
``anchors.npy`` for :class:`cxrdistill.deploy.runtime.OnnxModel`. The graph has a dynamic batch
axis and a fixed ``image_size`` input (the anchors belong to that size).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cxrdistill.atomic import atomic_write, write_json_atomic
from cxrdistill.deploy.runtime import DEPLOY_FORMAT

OPSET = 17


class _DetectorGraph(nn.Module):
    """RetinaNet -> ``(cls_logits (B, A, C), box_deltas (B, A, 4))``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        from collections import OrderedDict

        m = self.model
        feats = m.backbone(images)
        fpn_in = OrderedDict((f"p{level}", feats[level - 2]) for level in m._backbone_levels)
        fpn = list(m.fpn(fpn_in).values())[: len(m.fpn_levels)]
        return m.cls_head(fpn), m.box_head(fpn)


class _ProbabilityGraph(nn.Module):
    """Heat-map or classifier -> sigmoid probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return torch.sigmoid(self.model(images))


def export_onnx(model: nn.Module, meta: dict[str, Any], out_dir: Path, *, postprocess: dict[str, Any] | None = None
                ) -> Path:
    """Write the ONNX export folder of `model` (an `load_exported_model` pair) to `out_dir`."""
    import io

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = meta["model"]["kind"]
    size = int(meta["image_size"])
    model = model.eval().cpu()
    graph: nn.Module = (_DetectorGraph(model) if kind == "detector" else _ProbabilityGraph(model)).eval()
    names = ["cls_logits", "box_deltas"] if kind == "detector" else ["probs"]
    example = torch.zeros(2, 1, size, size)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / legacy-exporter notices: the graph is checked by the tests
        torch.onnx.export(graph, (example,), buffer, input_names=["images"], output_names=names,
                          dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                          opset_version=OPSET, dynamo=False)
    atomic_write(out_dir / "model.onnx", lambda f: f.write(buffer.getvalue()))
    description: dict[str, Any] = {"format": DEPLOY_FORMAT, "version": 1, "kind": kind,
                                   "class_names": list(meta["class_names"]), "image_size": size,
                                   "input": "images (B, 1, S, S) float32 grey in [0, 1], S = image_size",
                                   "outputs": names, "postprocess": dict(postprocess or {})}
    if kind == "detector":
        with torch.no_grad():
            level_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in _fpn_sizes(model, example[:1])]
            anchors = model.anchors_for(level_sizes, torch.device("cpu"), torch.float32).numpy()
        atomic_write(out_dir / "anchors.npy", lambda f: np.save(f, anchors.astype(np.float32)))
        description["postprocess"] = {"score_thresh": 0.05, "nms_thresh": 0.5, "max_detections": 100,
                                      "topk_candidates": 1000, **description["postprocess"]}
    elif kind == "heatmap":
        description["output_stride"] = int(model.output_stride)
        description["postprocess"] = {"box_threshold": 0.5, **description["postprocess"]}
    write_json_atomic(out_dir / "deploy.json", description, indent=2)
    return out_dir


def _fpn_sizes(model: nn.Module, image: Tensor) -> list[Tensor]:
    from collections import OrderedDict

    feats = model.backbone(image)
    fpn_in = OrderedDict((f"p{level}", feats[level - 2]) for level in model._backbone_levels)
    return list(model.fpn(fpn_in).values())[: len(model.fpn_levels)]
