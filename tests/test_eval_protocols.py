"""Evaluation protocols of the seed papers (`cxrdistill evaluate --protocol`) and the FROC vs MONAI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cxrdistill.cli import app
from cxrdistill.eval.detection import (
    CEIRD_PROTOCOL,
    VOC_PROTOCOL,
    coco_evaluate,
    voc_ap,
    voc_detection_summary,
    voc_evaluate,
)
from cxrdistill.eval.froc import lesion_froc
from cxrdistill.eval.predictions import ground_truth_from_coco


def _coco() -> dict:
    """Two images; class "a" has 3 boxes (2 in image 1, 1 in image 2), class "b" none."""
    return {
        "images": [{"id": 1, "width": 100, "height": 100, "split": "test"},
                   {"id": 2, "width": 100, "height": 100, "split": "test"}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [60, 60, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [30, 30, 20, 20], "area": 400, "iscrowd": 0},
        ],
    }


# score order: TP (GT 1), FP (nowhere), TP (GT 3), FP (duplicate of GT 3); GT 2 is missed
ROWS = [
    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
    {"image_id": 1, "category_id": 1, "bbox": [0, 80, 10, 10], "score": 0.8},
    {"image_id": 2, "category_id": 1, "bbox": [31, 31, 20, 20], "score": 0.7},
    {"image_id": 2, "category_id": 1, "bbox": [30, 29, 20, 21], "score": 0.6},
    {"image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 0.04},  # "b": below CEIRD's floor
]


def test_voc_all_point_ap_equals_the_hand_computed_value():
    gt = ground_truth_from_coco(_coco(), split="test")
    # recall 1/3, 1/3, 2/3, 2/3 at precision 1, 1/2, 2/3, 1/2; the envelope is 1 up to recall 1/3 and
    # 2/3 up to 2/3: AP = 1/3 * 1 + 1/3 * 2/3 = 5/9 (VOC07's 11-point rule would give 6/11)
    ap = voc_evaluate(gt, ROWS, iou=0.5)
    assert ap[0] == pytest.approx(5 / 9)
    assert np.isnan(ap[1])  # VOC: class without ground truth is undefined
    assert voc_ap(np.array([1 / 3, 1 / 3, 2 / 3, 2 / 3]), np.array([1, 0.5, 2 / 3, 0.5])) == pytest.approx(5 / 9)
    coco = coco_evaluate(gt, ROWS).ap_per_class(iou=0.5)[0]  # 101-point sampling: a different number
    assert coco != pytest.approx(5 / 9, abs=1e-3)


def test_ceird_protocol_floors_scores_and_scores_absent_classes_zero():
    gt = ground_truth_from_coco(_coco(), split="test")
    summary = voc_detection_summary(gt, ROWS, [0.5], CEIRD_PROTOCOL)
    assert summary["per_class"]["a"]["AP@0.5"] == pytest.approx(5 / 9)
    assert summary["per_class"]["b"]["AP@0.5"] == 0.0  # no ground truth: AP 0, and it counts in the mean
    assert summary["mAP@0.5"] == pytest.approx(5 / 18)
    assert voc_detection_summary(gt, ROWS, [0.5], VOC_PROTOCOL)["mAP@0.5"] == pytest.approx(5 / 9)
    # the floor: a true positive scoring 0.05 is dropped (kept only when > 0.05)
    low = [dict(ROWS[0], score=0.05)]
    assert voc_evaluate(gt, low, 0.5, CEIRD_PROTOCOL)[0] == 0.0
    assert voc_evaluate(gt, low, 0.5, VOC_PROTOCOL)[0] == pytest.approx(1 / 3)


def test_evaluate_cli_protocol_flag(tmp_path):
    manifest, predictions = tmp_path / "gt.json", tmp_path / "pred.json"
    manifest.write_text(json.dumps(_coco()))
    predictions.write_text(json.dumps(ROWS))
    runner = CliRunner()
    for protocol, expected in (("voc", 5 / 9), ("ceird", 5 / 18)):
        out = tmp_path / f"{protocol}.json"
        res = runner.invoke(app, ["evaluate", "--manifest", str(manifest), "--predictions", str(predictions),
                                  "--n-boot", "10", "--iou", "0.5", "--protocol", protocol, "--out", str(out)])
        assert res.exit_code == 0, res.output
        det = json.loads(out.read_text())["detection"]
        assert det["protocol"] == protocol and det["mAP@0.5"] == pytest.approx(expected)
    res = runner.invoke(app, ["evaluate", "--manifest", str(manifest), "--predictions", str(predictions),
                              "--protocol", "kaggle"])
    assert res.exit_code == 2 and "--protocol" in res.output


def test_lesion_froc_curve_matches_monai():
    from monai.metrics import compute_froc_curve_data, compute_froc_score

    rng = np.random.default_rng(0)
    gt_boxes, det_boxes, det_scores = [], [], []
    for _ in range(12):
        lesions = rng.uniform(0, 80, size=(rng.integers(0, 3), 2))
        gt_boxes.append(np.concatenate([lesions, lesions + 15], axis=1))
        n = rng.integers(0, 6)
        centres = rng.uniform(0, 95, size=(n, 2))
        det_boxes.append(np.concatenate([centres - 3, centres + 3], axis=1))
        det_scores.append(rng.uniform(size=n))
    ours = lesion_froc(gt_boxes, det_boxes, det_scores)
    # the same hits, handed to MONAI: per lesion the best hitting score (MONAI's tp_probs), the FPs' scores
    lesion_scores, fp_scores = [], []
    for gt, det, sc in zip(gt_boxes, det_boxes, det_scores):
        cx, cy = (det[:, 0] + det[:, 2]) / 2, (det[:, 1] + det[:, 3]) / 2
        hit = ((cx[:, None] >= gt[None, :, 0]) & (cx[:, None] <= gt[None, :, 2])
               & (cy[:, None] >= gt[None, :, 1]) & (cy[:, None] <= gt[None, :, 3]))
        for n in range(len(gt)):
            if hit[:, n].any():
                lesion_scores.append(sc[hit[:, n]].max())
        fp_scores += list(sc[~hit.any(axis=1)])
    n_lesions = sum(len(g) for g in gt_boxes)
    assert ours.n_lesions == n_lesions and 0 < len(lesion_scores) < n_lesions
    fps, sens = compute_froc_curve_data(np.array(fp_scores), np.array(lesion_scores), n_lesions, len(gt_boxes))
    ours_points = set(zip(np.round(ours.fp, 9), np.round(ours.sensitivity, 9)))
    assert set(zip(np.round(fps, 9), np.round(sens, 9))) <= ours_points  # MONAI's curve lies on ours
    # at FP rates that are operating points of the curve, MONAI's interpolated score equals ours
    rates = tuple(sorted({float(f) for f in fps if 0 < f and np.sum(np.isclose(fps, f)) == 1})[:4])
    assert rates
    ours_at = lesion_froc(gt_boxes, det_boxes, det_scores, rates=rates)
    assert ours_at.score == pytest.approx(float(compute_froc_score(fps, sens, rates)))
