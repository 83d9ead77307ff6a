"""FROC on hand-made cases: lesion-level FROC and the AALS modified (pixel) FROC."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxrdistill.eval.froc import ModifiedFroc, boxes_to_score_map, lesion_froc, sensitivity_at


def test_lesion_froc_by_hand():
    # image 0: lesions A, B; image 1: lesion C; image 2: none. 4 images → FPs per image = FPs / 4.
    gt = [np.array([[0, 0, 10, 10], [50, 50, 70, 70]]), np.array([[0, 0, 20, 20]]), np.zeros((0, 4)), np.zeros((0, 4))]
    det = [np.array([[1, 1, 9, 9], [2, 2, 8, 8], [100, 100, 110, 110]]),  # hits A (0.9), A again (0.8), FP (0.7)
           np.array([[5, 5, 15, 15]]),                                     # centre (10,10) in C: hit 0.4
           np.array([[0, 0, 5, 5]]), np.zeros((0, 4))]                      # FP 0.6 on an empty image
    sc = [np.array([0.9, 0.8, 0.7]), np.array([0.4]), np.array([0.6]), np.zeros(0)]
    r = lesion_froc(gt, det, sc, rates=(0.25, 0.5, 1.0))
    # thresholds 0.9: (0 FP, 1/3) 0.8: same 0.7: (1/4, 1/3) 0.6: (2/4, 1/3) 0.4: (2/4, 2/3)
    np.testing.assert_allclose(r.sensitivity_at_rates, [1 / 3, 2 / 3, 2 / 3])
    assert r.score == pytest.approx(5 / 9) and r.n_lesions == 3 and r.n_images == 4
    # IoU criterion: [5,5,15,15] vs [0,0,20,20] has IoU 0.25 → a miss (and an FP) at 0.5, a hit at 0.2
    strict = lesion_froc(gt, det, sc, rates=(8.0,), criterion="iou", iou_threshold=0.5)
    assert strict.sensitivity_at_rates[0] == pytest.approx(1 / 3)
    loose = lesion_froc(gt, det, sc, rates=(8.0,), criterion="iou", iou_threshold=0.2)
    assert loose.sensitivity_at_rates[0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="criterion"):
        lesion_froc(gt, det, sc, criterion="dice")


def test_lesion_froc_without_lesions_is_undefined():
    r = lesion_froc([np.zeros((0, 4))], [np.array([[0, 0, 1, 1]])], [np.array([0.5])])
    assert math.isnan(r.score) and r.to_dict()["score"] is None


def test_modified_froc_by_hand():
    # 10x10 image, one lesion box [2,2,6,6) with centre pixel (4,4).
    m = np.zeros((10, 10))
    m[4, 4] = 0.8           # centre activated up to 0.8
    m[0, 0] = 0.9           # one FP pixel at 0.9 → 1% FP ratio
    m[9, 5:9] = 0.5         # four FP pixels at 0.5 → 5% with the first
    acc = ModifiedFroc(bins=10, ratios=(0.005, 0.01, 0.05))
    acc.add(m, np.array([[2, 2, 6, 6]]))
    r = acc.result()
    # t=0.9: 1% FP, recall 0; t=0.8: 1%, recall 1 → at 0.5% nothing, at 1% recall 1
    np.testing.assert_allclose(r.sensitivity_at_rates, [0.0, 1.0, 1.0])
    # a second image with no lesion and 20% activated pixels halves nothing below 10% once averaged
    acc2 = ModifiedFroc(bins=10, ratios=(0.01, 0.06))
    acc2.add(m, np.array([[2, 2, 6, 6]]))
    bg = np.zeros((10, 10))
    bg[:2] = 0.85           # 20% of pixels at 0.85 → mean FP ratio (1% + 20%) / 2 at t ≤ 0.8
    acc2.add(bg, np.zeros((0, 4)))
    r2 = acc2.result()
    assert r2.n_images == 2 and r2.sensitivity_at_rates.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        acc2.add(np.full((4, 4), 2.0), np.zeros((0, 4)))


def test_boxes_to_score_map_takes_highest_covering_score():
    m = boxes_to_score_map(np.array([[0, 0, 4, 4], [2, 2, 6, 6]]), np.array([0.3, 0.7]), 8, 8)
    assert m[1, 1] == pytest.approx(0.3) and m[3, 3] == pytest.approx(0.7) and m[7, 7] == 0


def test_sensitivity_at_picks_best_point_within_rate():
    fp, sens = np.array([0, 0.5, 1.0, 3.0]), np.array([0, 0.4, 0.6, 0.9])
    np.testing.assert_allclose(sensitivity_at(fp, sens, [0.25, 1.0, 2.0, 8.0]), [0, 0.6, 0.6, 0.9])
