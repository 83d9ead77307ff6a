"""Calibration of the report classifier's probabilities (CEIRD's RPDLR / APCLR cut at 0.5)."""

from __future__ import annotations

import numpy as np
import pytest

from cxrdistill.methods.registry import validate_method_params
from cxrdistill.models.report import (
    CalibratedReportClassifier,
    ProbabilityCalibration,
    TfidfReportClassifier,
    calibrate_report_classifier,
    expected_calibration_error,
)


def test_ece_matches_a_hand_computed_value():
    probs = np.array([[0.1], [0.15], [0.9], [0.95]])
    targets = np.array([[0.0], [1.0], [1.0], [1.0]])
    # bin 1 (0.1, 0.15): |0.5 - 0.125| = 0.375, weight 1/2; bin 9 (0.9, 0.95): |1 - 0.925| = 0.075, weight 1/2
    assert expected_calibration_error(probs, targets) == pytest.approx(0.5 * 0.375 + 0.5 * 0.075)
    targets[0, 0] = np.nan  # unknown labels are left out
    assert expected_calibration_error(probs, targets) == pytest.approx(
        (1 / 3) * abs(1 - 0.15) + (2 / 3) * 0.075)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_repairs_overconfident_probabilities(method):
    rng = np.random.default_rng(0)
    true_p = rng.uniform(0.05, 0.95, size=(4000, 2))
    y = (rng.uniform(size=true_p.shape) < true_p).astype(float)
    z = np.log(true_p / (1 - true_p))
    overconfident = 1 / (1 + np.exp(-3 * z))  # logits three times too large
    before = expected_calibration_error(overconfident, y)
    calibration = ProbabilityCalibration.fit(overconfident[:2000], y[:2000], method)
    after = expected_calibration_error(calibration.apply(overconfident[2000:]), y[2000:])
    assert before > 0.1 and after < 0.04, (before, after)
    again = ProbabilityCalibration.from_dict(calibration.to_dict())
    assert np.allclose(again.apply(overconfident), calibration.apply(overconfident))


def test_a_calibrated_tfidf_model_saves_loads_and_records_its_ece(tmp_path):
    rng = np.random.default_rng(1)
    words = ["effusion", "clear", "nodule", "normal"]
    texts = [" ".join(rng.choice(words, 4)) for _ in range(60)]
    targets = np.array([[float("effusion" in t), float("nodule" in t)] for t in texts])
    base = TfidfReportClassifier(num_classes=2).fit(texts, targets)

    def fit_fold(rows):
        return TfidfReportClassifier(num_classes=2).fit([texts[i] for i in rows], targets[rows])

    model = calibrate_report_classifier(base, fit_fold, texts, targets, "platt", folds=5)
    assert isinstance(model, CalibratedReportClassifier)
    assert set(model.summary) >= {"ECE_before", "ECE_after"} and model.summary["ECE_after"] <= model.summary["ECE_before"]
    model.save(tmp_path / "m")
    loaded = CalibratedReportClassifier.wrap_if_calibrated(TfidfReportClassifier.load(tmp_path / "m"), tmp_path / "m")
    assert np.allclose(loaded.predict_proba(texts), model.predict_proba(texts))
    assert calibrate_report_classifier(base, fit_fold, texts, targets, "none") is base


def test_ceird_uses_one_threshold_rule_for_teacher_and_student_by_default():
    params = validate_method_params("ceird", {"pseudo_score_thresh": 0.3})
    assert params.sa_nms_score_thresh is None  # SA-NMS then takes pseudo_score_thresh (ceird.run)
    assert validate_method_params("ceird", {"sa_nms_score_thresh": 0.6}).sa_nms_score_thresh == 0.6
