"""eval/runs.py: predictions in original pixels, files written, metrics equal the file-based path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxrdistill.data.study import StudyData, synthetic_world
from cxrdistill.eval.metrics import evaluate_files
from cxrdistill.eval.runs import (
    detections_to_rows,
    evaluate_classifier,
    evaluate_detections,
    evaluate_detector,
    evaluate_heatmap,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    manifest = synthetic_world({"n_images": 30, "image_size": 64, "seed": 5}, root)
    return StudyData.open(manifest, image_size=32, cache_dir=root / "cache")


def test_truth_boxes_as_detections_score_perfectly_and_files_round_trip(data, tmp_path):
    test = data.dataset("test")
    dets = {}
    for rec in test.images:
        boxes, labels = data.manifest.boxes_xyxy(rec.id)
        sx, sy = test.scale_of(rec)
        dets[rec.id] = {"boxes": torch.from_numpy(boxes * np.array([sx, sy, sx, sy], np.float32)),
                        "scores": torch.ones(len(boxes)), "labels": torch.from_numpy(labels)}
    rows = detections_to_rows(dets, test)
    assert rows and all(r["category_id"] in data.manifest.category_ids for r in rows)
    metrics = evaluate_detections(dets, test, tmp_path, split="test", n_boot=50)
    defined = [v for v in (metrics["detection"]["mAP@0.5"],) if v is not None]
    assert defined and defined[0] == pytest.approx(1.0)
    # the written files give the same numbers through the CLI path
    coco = data.manifest.to_coco_dict()
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    again = evaluate_files(tmp_path / "gt.json", tmp_path / "predictions.json", split="test", n_boot=50)
    assert again["detection"]["mAP"] == pytest.approx(metrics["detection"]["mAP"])


def test_model_evaluators_write_metrics(data, tmp_path):
    from cxrdistill.models.classifier import ImageClassifier
    from cxrdistill.models.detector import RetinaNet
    from cxrdistill.models.heatmap import HeatmapFPN

    torch.manual_seed(0)
    test = data.dataset("test")
    det = RetinaNet(data.num_classes, base_width=8, fpn_channels=16, head_convs=1, fpn_levels=(3, 4, 5))
    m = evaluate_detector(det, test, tmp_path / "det", split="test", n_boot=20)
    assert set(m) >= {"detection", "classification", "froc"} and (tmp_path / "det" / "metrics.json").is_file()
    clf = ImageClassifier("resnet18", data.num_classes, tiny=True)
    m = evaluate_classifier(clf, test, tmp_path / "cls", split="test", n_boot=20)
    assert "detection" not in m and len(m["classification"]["per_class"]) == data.num_classes
    assert (tmp_path / "cls" / "image_scores.json").is_file()
    hm = HeatmapFPN(data.num_classes, base_width=8, fpn_channels=16)
    m = evaluate_heatmap(hm, test, tmp_path / "hm", split="test", n_boot=20)
    assert "modified_froc_heatmaps" in m and "classification" in m
