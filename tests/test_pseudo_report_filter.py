import pytest
import torch

from cxrdistill.errors import CxrDistillError
from cxrdistill.pseudo.report_filter import (
    detections_to_presence,
    filter_boxes_by_image_labels,
    filter_labels_by_detections,
)


def _dets():
    return [
        {
            "boxes": torch.arange(16, dtype=torch.float32).reshape(4, 4),
            "scores": torch.tensor([0.9, 0.8, 0.7, 0.3]),
            "labels": torch.tensor([0, 1, 2, 1]),
        },
        {"boxes": torch.zeros(1, 4), "scores": torch.tensor([0.6]), "labels": torch.tensor([2])},
    ]


def test_rpdlr_removes_exactly_the_classes_absent_from_the_report():
    present = torch.tensor([[True, False, True], [False, False, False]])
    out = filter_boxes_by_image_labels(_dets(), present)
    assert out[0]["labels"].tolist() == [0, 2]
    assert out[0]["boxes"].tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert out[1]["boxes"].shape == (0, 4)


def test_rpdlr_from_report_probabilities():
    probs = torch.tensor([[0.2, 0.7, 0.4], [0.1, 0.1, 0.9]])
    out = filter_boxes_by_image_labels(_dets(), probs, thresh=0.5)
    assert out[0]["labels"].tolist() == [1, 1] and out[1]["labels"].tolist() == [2]
    with pytest.raises(ValueError, match="thresh"):
        filter_boxes_by_image_labels(_dets(), probs)


def test_rpdlr_names_the_image_with_an_unknown_class():
    with pytest.raises(CxrDistillError, match=r"detections\[0\]: class index 2"):
        filter_boxes_by_image_labels(_dets(), torch.ones(2, 2, dtype=torch.bool))


def test_presence_from_detections_uses_the_score_threshold():
    present = detections_to_presence(_dets(), num_classes=4, score_thresh=0.75)
    assert present.tolist() == [[True, True, False, False], [False, False, False, False]]


def test_apclr_drops_undetected_positives_and_keeps_negatives():
    report = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    detected = torch.tensor([[True, False, True, False], [False, True, True, True]])
    refined = filter_labels_by_detections(report, detected)
    # a positive survives only where detected; detections never add a positive
    assert refined.tolist() == [[1, 0, 0, 0], [0, 1, 1, 0]]
    soft = filter_labels_by_detections(torch.tensor([[0.9, 0.6, 0.2, 0.1]]), detected[:1])
    assert soft[0].tolist() == pytest.approx([0.9, 0.0, 0.2, 0.0])
