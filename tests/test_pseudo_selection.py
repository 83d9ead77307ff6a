"""Per-class pseudo-label thresholds: precision@P calibrated on a validation split reaches P on a
held-out split; top-κ keeps κ boxes per class; the collapse guard counts what passes."""

from __future__ import annotations

import pytest
import torch

from cxrdistill.pseudo.collapse import PseudoLabelCollapse, check_collapse, guard
from cxrdistill.pseudo.selection import (
    NEVER,
    PseudoSelection,
    expected_counts,
    kept_per_class,
    precision_threshold,
    precision_thresholds,
    topk_thresholds,
    true_positive_flags,
)

NAMES = ["easy", "hard", "rare"]


def synthetic_split(n_images: int, seed: int, sharpness: dict[int, float]):
    """Images with three truth boxes per class (class 2 only every 20th image) and detections whose
    chance of sitting on the truth box grows with the score, more steeply for ``sharpness[c]``."""
    g = torch.Generator().manual_seed(seed)
    dets, truth = [], []
    for i in range(n_images):
        t_boxes, t_labels, boxes, scores, labels = [], [], [], [], []
        for c in range(3):
            if c == 2 and i % 20:
                continue
            for j in range(3):  # three truth boxes per class, one candidate detection each
                x = 100.0 * c + 30.0 * j
                t_boxes.append([x, 0, x + 20, 20])
                t_labels.append(c)
                s = float(torch.rand(1, generator=g))
                hit = float(torch.rand(1, generator=g)) < s ** sharpness.get(c, 1.0)
                boxes.append([x + 1, 1, x + 21, 21] if hit else [x, 200, x + 20, 220])
                scores.append(s)
                labels.append(c)
        truth.append({"boxes": torch.tensor(t_boxes).reshape(-1, 4), "labels": torch.tensor(t_labels)})
        dets.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": torch.tensor(scores),
                     "labels": torch.tensor(labels)})
    return dets, truth


def precision_of(dets, truth, thresholds, cls):
    flags = true_positive_flags(dets, truth, 0.5)
    tp = n = 0
    for d, f in zip(dets, flags):
        keep = (d["labels"] == cls) & (d["scores"] >= thresholds[cls])
        tp += int(f[keep].sum())
        n += int(keep.sum())
    return tp / max(n, 1), n


def test_precision_at_p_thresholds_reach_the_requested_precision_on_a_held_out_split():
    sharp = {0: 1.0, 1: 2.0}  # class 1's boxes are right less often at the same score
    val_dets, val_truth = synthetic_split(400, seed=1, sharpness=sharp)
    test_dets, test_truth = synthetic_split(400, seed=2, sharpness=sharp)
    fallback = topk_thresholds(val_dets, torch.tensor([10, 10, 3]), NAMES)
    sel = precision_thresholds(val_dets, val_truth, 0.8, NAMES, min_val_boxes=100, fallback=fallback)
    # P(hit | s) = s for "easy": precision of scores >= t is (1 + t) / 2 -> t ≈ 0.6; "hard" needs more
    assert 0.5 < float(sel.thresholds[0]) < 0.7
    assert float(sel.thresholds[1]) > float(sel.thresholds[0])
    for c in (0, 1):
        assert sel.records[NAMES[c]]["source"] == "precision"
        held_out, n = precision_of(test_dets, test_truth, sel.thresholds, c)
        assert n > 100 and held_out == pytest.approx(0.8, abs=0.05)
    # "rare" has 60 validation boxes < 100: it takes the top-κ threshold instead
    assert sel.records["rare"]["source"] == "topk_fallback"
    assert float(sel.thresholds[2]) == float(fallback.thresholds[2])
    # a precision the teacher never reaches (its best "hard" box is a miss) keeps nothing, and says so
    misses = [{**d, "scores": torch.where(d["labels"] == 1, d["scores"] * 0.5, d["scores"])} for d in val_dets]
    misses[0] = {"boxes": torch.tensor([[500.0, 500, 520, 520]]), "scores": torch.tensor([0.99]),
                 "labels": torch.tensor([1])}
    never = precision_thresholds(misses, val_truth, 1.0, NAMES, min_val_boxes=100)
    assert never.records["hard"]["source"] == "precision_unreachable" and float(never.thresholds[1]) == NEVER
    assert never.to_dict()["thresholds"]["hard"] is None


def test_precision_threshold_cuts_only_between_distinct_scores():
    scores = torch.tensor([0.9, 0.8, 0.8, 0.7, 0.1])
    tp = torch.tensor([True, True, False, True, False])
    assert precision_threshold(scores, tp, 1.0) == pytest.approx(0.9)  # 0.8 would keep the tied miss
    assert precision_threshold(scores, tp, 0.75) == pytest.approx(0.7)
    assert precision_threshold(torch.zeros(0), torch.zeros(0, dtype=torch.bool), 0.5) == NEVER


def test_topk_per_class_keeps_the_expected_count_of_each_class():
    labeled = [{"boxes": torch.zeros(3, 4), "labels": torch.tensor([0, 0, 1])},
               {"boxes": torch.zeros(1, 4), "labels": torch.tensor([0])}]
    kappa = expected_counts(labeled, n_unlabeled=4, num_classes=3)
    assert kappa.tolist() == [6, 2, 0]  # 1.5 and 0.5 boxes per labeled image, class 2 never labeled
    dets = [{"boxes": torch.zeros(5, 4), "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]),
             "labels": torch.tensor([0, 0, 0, 1, 1])} for _ in range(4)]
    sel = topk_thresholds(dets, kappa, NAMES)
    kept = kept_per_class(dets, sel.thresholds, NAMES)
    assert kept == {"easy": 8, "hard": 4, "rare": 0}  # ties at the κ-th score are kept together
    assert float(sel.thresholds[0]) == pytest.approx(0.8) and float(sel.thresholds[2]) == NEVER


def test_collapse_guard_floor_and_missing_class():
    dets = [{"boxes": torch.zeros(1, 4), "scores": torch.tensor([0.4]), "labels": torch.tensor([0])}] * 2 + \
           [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * 98
    report = check_collapse(dets, torch.tensor([0.3, 0.3, 0.3]), NAMES, ["easy", "hard"])
    assert report.kept_per_class == {"easy": 2, "hard": 0, "rare": 0} and report.images_with_box == 2
    assert report.collapsed and len(report.reasons) == 2 and "'hard'" in report.reasons[1]
    assert report.score_quantiles["easy"]["0.5"] == pytest.approx(0.4) and report.score_quantiles["hard"]["0.5"] is None
    with pytest.raises(PseudoLabelCollapse, match="precision@0.8"):
        guard(report, "stop")
    fine = check_collapse(dets[:2], torch.tensor([0.3, 0.3, 0.3]), NAMES, ["easy"])
    assert not fine.collapsed
    guard(fine, "stop")  # nothing to say


def test_selection_parameter_is_validated():
    assert PseudoSelection(selection="precision@0.8").precision == 0.8
    assert PseudoSelection().selection == "fixed" and PseudoSelection(selection="topk_per_class").precision is None
    for bad in ("precision@", "precision@1.5", "top5"):
        with pytest.raises(ValueError, match="pseudo.selection"):
            PseudoSelection(selection=bad)
