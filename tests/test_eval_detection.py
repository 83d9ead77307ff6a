"""COCO detection AP: the numpy evaluator equals pycocotools exactly; undefined classes are reported."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cxrdistill.errors import CxrDistillError, ManifestError
from cxrdistill.eval.detection import (
    CEIRD_IOUS,
    OXNET_IOUS,
    CocoParams,
    coco_evaluate,
    detection_summary,
    pycocotools_evaluate,
)
from cxrdistill.eval.predictions import ground_truth_from_coco, load_ground_truth, load_predictions


def random_world(seed: int, n_img: int = 30, n_cls: int = 4, absent: tuple[int, ...] = (3,), crowd: float = 0.1):
    """Random GT (some images empty, class `absent` never in GT, some crowd boxes) and noisy predictions
    (near-GT boxes, random boxes, tied scores, predictions on empty images and for the absent class)."""
    rng = np.random.default_rng(seed)
    images = [{"id": 3 * i + 1, "file_name": f"{i}.png", "width": 256, "height": 256} for i in range(n_img)]
    anns, rows = [], []
    present = [k for k in range(n_cls) if k not in absent]
    for im in images:
        for _ in range(rng.integers(0, 5)):
            x, y = rng.uniform(0, 200, 2)
            w, h = rng.uniform(2, 150, 2)
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": int(rng.choice(present)) + 1,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < crowd)})
        for _ in range(rng.integers(0, 15)):
            if anns and rng.random() < 0.5:
                a = anns[rng.integers(len(anns))]
                b = np.array(a["bbox"]) + rng.normal(0, 8, 4)
                b[2:] = np.abs(b[2:]) + 1
                iid, cid = a["image_id"], a["category_id"]
            else:
                b = np.r_[rng.uniform(0, 200, 2), rng.uniform(2, 150, 2)]
                iid, cid = im["id"], int(rng.integers(0, n_cls)) + 1
            rows.append({"image_id": iid, "category_id": cid, "bbox": [float(v) for v in b],
                         "score": float(np.round(rng.random(), 1))})  # rounded: many ties
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": f"class{k}"} for k in range(n_cls)]}
    return ground_truth_from_coco(coco), rows


PARAMS = [CocoParams(), CocoParams(iou_thresholds=CEIRD_IOUS, max_dets=(1, 3, 5)), CocoParams(iou_thresholds=OXNET_IOUS)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("params", PARAMS, ids=["coco", "ceird-smallmaxdets", "oxnet"])
def test_equals_pycocotools_on_random_predictions(seed, params):
    gt, rows = random_world(seed)
    ours, ref = coco_evaluate(gt, rows, params), pycocotools_evaluate(gt, rows, params)
    assert ours.precision.shape == ref.precision.shape
    np.testing.assert_array_equal(ours.precision, ref.precision)
    np.testing.assert_array_equal(ours.recall, ref.recall)
    assert 0 < ours.ap() < 1


def test_empty_predictions_give_zero_ap_and_absent_class_is_undefined():
    gt, _ = random_world(5)
    ours, ref = coco_evaluate(gt, [], CocoParams(CEIRD_IOUS)), pycocotools_evaluate(gt, [], CocoParams(CEIRD_IOUS))
    np.testing.assert_array_equal(ours.precision, ref.precision)
    per = ours.ap_per_class(iou=0.5)
    assert per[:3].tolist() == [0.0, 0.0, 0.0] and math.isnan(per[3])
    s = detection_summary(ours, gt.class_names)
    assert s["mAP@0.25"] == 0.0 and s["per_class"]["class3"]["AP"] is None
    assert s["undefined_classes"] == ["class3"]
    json.dumps(s)  # JSON-ready: no NaN


def _tiny(anns, rows, n_img=2):
    coco = {"images": [{"id": i + 1, "file_name": f"{i}.png"} for i in range(n_img)],
            "annotations": [dict(a, id=i + 1) for i, a in enumerate(anns)],
            "categories": [{"id": 1, "name": "nodule"}, {"id": 2, "name": "effusion"}]}
    return ground_truth_from_coco(coco), rows


def test_false_positive_on_image_without_boxes_halves_precision():
    box = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "iscrowd": 0}
    gt, _ = _tiny([box], [])
    hit = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9}
    fp_empty = {"image_id": 2, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.95}
    p = CocoParams(CEIRD_IOUS)
    assert coco_evaluate(gt, [hit], p).ap(iou=0.5) == pytest.approx(1.0)
    r = coco_evaluate(gt, [hit, fp_empty], p)
    assert r.ap(iou=0.5) == pytest.approx(0.5)
    np.testing.assert_array_equal(r.precision, pycocotools_evaluate(gt, [hit, fp_empty], p).precision)


def test_detections_on_a_crowd_box_are_ignored_not_false_positives():
    gt, _ = _tiny([{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "iscrowd": 0},
                   {"image_id": 1, "category_id": 1, "bbox": [100, 100, 100, 100], "iscrowd": 1}], [])
    rows = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.5}] + [
        {"image_id": 1, "category_id": 1, "bbox": [110 + i, 110, 30, 30], "score": 0.9} for i in range(3)]
    r = coco_evaluate(gt, rows, CocoParams(CEIRD_IOUS))
    assert r.ap(iou=0.5) == pytest.approx(1.0)
    np.testing.assert_array_equal(r.precision, pycocotools_evaluate(gt, rows, CocoParams(CEIRD_IOUS)).precision)


def test_area_ranges_split_small_and_large_boxes():
    gt, _ = _tiny([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
                   {"image_id": 2, "category_id": 1, "bbox": [0, 0, 200, 200], "iscrowd": 0}], [])
    rows = [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 200, 200], "score": 0.8}]  # only the large one found
    r = coco_evaluate(gt, rows)
    assert r.ap(area="large") == pytest.approx(1.0)
    assert r.ap(area="small") == 0.0
    assert math.isnan(r.ap(area="medium"))  # no medium GT: undefined
    with pytest.raises(ValueError, match="not evaluated"):
        r.ap(iou=0.3)


def test_loader_filters_split_counts_other_splits_and_rejects_bad_rows(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.png", "split": "test"}, {"id": 2, "file_name": "b.png", "split": "train"}],
            "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 0}],
            "categories": [{"id": 1, "name": "nodule"}]}
    (tmp_path / "m.json").write_text(json.dumps(coco))
    gt = load_ground_truth(tmp_path / "m.json", split="test")
    assert gt.image_ids == [1] and gt.coco["annotations"] == []
    assert load_ground_truth(tmp_path / "m.json", split="train").coco["annotations"][0]["area"] == 25.0
    rows = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},
            {"image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    preds = load_predictions(tmp_path / "p.json", gt)
    assert len(preds.rows) == 1 and preds.dropped_other_split == 1 and "outside split" in preds.notes[0]
    (tmp_path / "bad.json").write_text(json.dumps([{"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1},
                                                   {"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1], "score": 1}]))
    with pytest.raises(CxrDistillError, match=r"row 0: image_id 9[\s\S]*row 1 \(image 1\): bbox"):
        load_predictions(tmp_path / "bad.json", gt)
    coco["annotations"][0]["category_id"] = 7
    (tmp_path / "m2.json").write_text(json.dumps(coco))
    with pytest.raises(ManifestError, match="annotation 1: unknown category_id 7"):
        load_ground_truth(tmp_path / "m2.json")
