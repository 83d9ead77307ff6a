"""Paired bootstrap comparison of two runs on the same images."""

from __future__ import annotations

import numpy as np
import pytest

from cxrdistill.eval.compare import compare_auroc, compare_detection, paired_stats
from cxrdistill.eval.detection import CocoParams
from test_eval_detection import random_world


def test_perfect_run_beats_noisy_run_and_a_run_ties_itself():
    gt, noisy = random_world(0, n_img=40)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt.coco["annotations"]]
    c = compare_detection(gt, noisy, perfect, CocoParams((0.5,)), n_boot=100, seed=1)
    assert c.b == pytest.approx(1.0) and c.diff == pytest.approx(c.b - c.a) and c.diff > 0.3
    assert 0 < c.ci_low < c.diff < c.ci_high and c.p_boot == 0.0
    same = compare_detection(gt, noisy, noisy, CocoParams((0.5,)), n_boot=50, seed=1)
    assert same.diff == 0 and same.ci_low == same.ci_high == 0 and same.p_boot == 1.0
    again = compare_detection(gt, noisy, perfect, CocoParams((0.5,)), n_boot=100, seed=1)
    assert again.ci_low == c.ci_low  # seeded


def test_auroc_comparison_detects_the_better_classifier():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 2)) < 0.4).astype(float)
    weak, strong = rng.normal(size=y.shape) + 0.3 * y, rng.normal(size=y.shape) + 2 * y
    c = compare_auroc(y, weak, strong, n_boot=200, seed=0)
    assert c.diff > 0.2 and c.ci_low > 0 and c.p_boot < 0.05
    d = c.to_dict()
    assert d["metric"] == "macro_AUROC" and d["n_boot"] == 200


def test_paired_stats_two_sided_fraction():
    c = paired_stats("m", 0.5, 0.6, np.zeros(10), np.r_[np.full(8, 0.1), np.full(2, -0.1)], seed=0)
    assert c.p_boot == pytest.approx(0.4)  # 2 * 2/10
