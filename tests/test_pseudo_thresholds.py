import pytest
import torch

from cxrdistill.errors import CxrDistillError
from cxrdistill.pseudo.thresholds import detections_to_targets, filter_detections


def _dets():
    return [
        {
            "boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40]]),
            "scores": torch.tensor([0.95, 0.5, 0.91]),
            "labels": torch.tensor([0, 1, 1]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)},
    ]


def test_stac_high_threshold_keeps_only_confident_boxes():
    out = filter_detections(_dets(), 0.9)
    assert out[0]["scores"].tolist() == pytest.approx([0.95, 0.91])
    assert out[0]["labels"].tolist() == [0, 1]
    assert out[0]["boxes"].tolist() == [[0, 0, 10, 10], [30, 30, 40, 40]]
    assert out[1]["boxes"].shape == (0, 4)


def test_per_class_thresholds_index_by_label():
    out = filter_detections(_dets(), torch.tensor([0.99, 0.4]))
    assert out[0]["labels"].tolist() == [1, 1]
    assert out[0]["scores"].tolist() == pytest.approx([0.5, 0.91])


def test_extra_per_box_entries_follow_the_boxes():
    dets = _dets()
    dets[0]["source"] = torch.tensor([0, 1, 1])
    assert filter_detections(dets, 0.9)[0]["source"].tolist() == [0, 1]


def test_bad_records_name_the_image():
    dets = _dets()
    dets[1] = {"boxes": torch.zeros(2, 4), "scores": torch.zeros(3), "labels": torch.zeros(2, dtype=torch.long)}
    with pytest.raises(CxrDistillError, match=r"detections\[1\]: scores"):
        filter_detections(dets, 0.5)
    with pytest.raises(CxrDistillError, match="class index 1 has no threshold"):
        filter_detections(_dets(), torch.tensor([0.5]))


def test_targets_hard_and_soft():
    hard = detections_to_targets(filter_detections(_dets(), 0.9), soft=False)
    assert set(hard[0]) == {"boxes", "labels"} and hard[0]["labels"].dtype == torch.long
    soft = detections_to_targets(filter_detections(_dets(), 0.9), soft=True)
    assert soft[0]["scores"].tolist() == pytest.approx([0.95, 0.91])
    assert soft[1]["scores"].shape == (0,)
