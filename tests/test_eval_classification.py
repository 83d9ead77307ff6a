"""AUROC: equal to scikit-learn, seeded bootstrap CIs, undefined classes reported."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrdistill.eval.classification import auroc, auroc_ranks, bootstrap_auroc, classification_summary


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_auroc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random((5, 60)) < 0.3
    s = np.round(rng.random((5, 60)) + 0.5 * y, 1)  # rounded: ties
    np.testing.assert_allclose(auroc_ranks(y, s), [roc_auc_score(y[r], s[r]) for r in range(5)], rtol=0, atol=1e-12)


def test_bootstrap_is_seeded_and_ci_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 3)) < 0.3).astype(float)
    s = rng.normal(size=(300, 3)) + y * np.array([2.0, 0.5, 0.0])
    a = bootstrap_auroc(y, s, n_boot=300, seed=7)
    b = bootstrap_auroc(y, s, n_boot=300, seed=7)
    np.testing.assert_array_equal(a.ci_low, b.ci_low)
    np.testing.assert_allclose(a.per_class, [roc_auc_score(y[:, k], s[:, k]) for k in range(3)])
    assert np.all(a.ci_low <= a.per_class) and np.all(a.per_class <= a.ci_high)
    assert a.ci_low[0] > 0.8 and a.ci_low[2] < 0.5 < a.ci_high[2]  # strong vs chance class
    assert a.macro == pytest.approx(a.per_class.mean())
    assert a.macro_ci[0] < a.macro < a.macro_ci[1]
    assert bootstrap_auroc(y, s, n_boot=300, seed=8).ci_low[0] != a.ci_low[0]


def test_class_without_positives_is_undefined_not_zero():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=float)
    s = np.array([[0.9, 0.1], [0.2, 0.3], [0.8, 0.2], [0.1, 0.9]])
    assert np.isnan(auroc(y, s)[1]) and auroc(y, s)[0] == 1.0
    summary = classification_summary(bootstrap_auroc(y, s, n_boot=50), ["nodule", "mass"])
    assert summary["per_class"]["mass"] == {"AUROC": None, "CI95": [None, None]}
    assert summary["macro_AUROC"] == 1.0 and summary["undefined_classes"] == ["mass"]
