import pytest
import torch

from cxrdistill.pseudo.sa_nms import STUDENT, TEACHER, self_adaptive_nms, self_adaptive_nms_batch


def _d(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def test_confident_student_box_replaces_overlapping_weaker_teacher_box():
    teacher = _d([[10, 10, 30, 30]], [0.6], [0])
    student = _d([[12, 12, 31, 31]], [0.9], [0])
    out = self_adaptive_nms(teacher, student)
    assert out["boxes"].tolist() == [[12, 12, 31, 31]]
    assert out["source"].tolist() == [STUDENT] and out["scores"].tolist() == pytest.approx([0.9])


def test_weaker_student_box_is_suppressed_by_teacher_box():
    out = self_adaptive_nms(_d([[10, 10, 30, 30]], [0.8], [0]), _d([[12, 12, 31, 31]], [0.7], [0]))
    assert out["source"].tolist() == [TEACHER]


def test_non_overlapping_boxes_of_both_are_kept_and_low_student_boxes_dropped():
    teacher = _d([[0, 0, 10, 10]], [0.7], [1])
    student = _d([[50, 50, 60, 60], [80, 80, 90, 90]], [0.8, 0.2], [1, 1])
    out = self_adaptive_nms(teacher, student, score_thresh=0.5)
    assert out["source"].tolist() == [STUDENT, TEACHER]
    assert out["boxes"].tolist() == [[50, 50, 60, 60], [0, 0, 10, 10]]


def test_different_classes_never_suppress_each_other():
    teacher = _d([[10, 10, 30, 30]], [0.6], [0])
    student = _d([[10, 10, 30, 30]], [0.9], [1])
    out = self_adaptive_nms(teacher, student)
    assert sorted(out["labels"].tolist()) == [0, 1] and len(out["boxes"]) == 2


def test_negative_coordinates_still_separate_classes():
    teacher = _d([[-40, -40, -20, -20]], [0.6], [0])
    student = _d([[-40, -40, -20, -20]], [0.9], [1])
    assert len(self_adaptive_nms(teacher, student)["boxes"]) == 2


def test_empty_inputs():
    empty = _d([], [], [])
    out = self_adaptive_nms(empty, empty)
    assert out["boxes"].shape == (0, 4) and out["source"].shape == (0,)
    only_teacher = self_adaptive_nms(_d([[0, 0, 5, 5]], [0.7], [0]), empty)
    assert only_teacher["source"].tolist() == [TEACHER]


def test_batch_variant_matches_per_image_and_checks_lengths():
    teachers = [_d([[10, 10, 30, 30]], [0.6], [0]), _d([], [], [])]
    students = [_d([[12, 12, 31, 31]], [0.9], [0]), _d([[0, 0, 4, 4]], [0.95], [2])]
    out = self_adaptive_nms_batch(teachers, students)
    assert [o["source"].tolist() for o in out] == [[STUDENT], [STUDENT]]
    with pytest.raises(ValueError, match="2 images but student has 1"):
        self_adaptive_nms_batch(teachers, students[:1])


def test_batched_nms_keeps_exactly_the_boxes_monai_kept():
    """SA-NMS now runs on the project's batched NMS: on clustered random boxes (many overlaps, ties
    of class only) it keeps the same boxes in the same order as MONAI's batched_nms did."""
    from monai.data.box_utils import batched_nms

    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        def dets(n):
            xy = torch.rand(6, 2, generator=g)[torch.randint(0, 6, (n,), generator=g)] * 200
            xy = xy + torch.randn(n, 2, generator=g) * 6
            wh = torch.rand(n, 2, generator=g) * 20 + 30
            return {"boxes": torch.cat([xy, xy + wh], 1), "scores": torch.rand(n, generator=g),
                    "labels": torch.randint(0, 3, (n,), generator=g)}
        teacher, student = dets(150), dets(150)
        ours = self_adaptive_nms(teacher, student, iou_thresh=0.5, score_thresh=0.0)
        boxes = torch.cat([teacher["boxes"], student["boxes"]])
        scores = torch.cat([teacher["scores"], student["scores"]])
        labels = torch.cat([teacher["labels"], student["labels"]])
        keep = batched_nms(boxes - boxes.min(), scores, labels, 0.5).long()
        assert 20 < len(keep) < 250  # the boxes overlap: NMS has work to do
        assert torch.equal(ours["boxes"], boxes[keep]) and torch.equal(ours["labels"], labels[keep])
