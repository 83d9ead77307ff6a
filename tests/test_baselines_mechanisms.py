"""The distinctive mechanism of each baseline, tested directly on inputs with a known answer."""

from __future__ import annotations

import math

import pytest
import torch

from cxrdistill.data.views import ViewConfig, random_view
from cxrdistill.methods.cam import cam_boxes
from cxrdistill.methods.pi_model import consistency_loss, ramp_up
from cxrdistill.methods.stac import pseudo_targets
from cxrdistill.methods.supervised import MultiTaskDetector, multitask_losses
from cxrdistill.methods.temporal_ensembling import EnsembleTargets
from cxrdistill.methods.unbiased_teacher import soft_teacher_cls_loss, teacher_targets_in_strong_view
from cxrdistill.models.detector import RetinaNet


def _tiny_detector(num_classes: int = 2) -> RetinaNet:
    torch.manual_seed(0)
    return RetinaNet(num_classes, base_width=8, fpn_channels=16, head_convs=1, fpn_levels=(3, 4, 5))


class _FixedTeacher:
    """A teacher whose weak-view detections are known: one confident box and one weak one."""

    def predict(self, images):
        return [{"boxes": torch.tensor([[10.0, 20.0, 20.0, 30.0], [0.0, 0.0, 8.0, 8.0]]),
                 "scores": torch.tensor([0.95, 0.3]), "labels": torch.tensor([1, 0])} for _ in images]


def test_unbiased_teacher_projects_teacher_boxes_from_weak_into_strong_view():
    images = torch.rand(2, 1, 64, 64)
    # weak view: always flipped; strong view: identity -> weak_to_strong is the flip
    generator = torch.Generator().manual_seed(0)
    weak, strong = random_view(images, ViewConfig(flip_p=1.0), generator), random_view(images, ViewConfig(), generator)
    targets = teacher_targets_in_strong_view(_FixedTeacher(), weak, strong, threshold=0.7)
    for t in targets:
        assert t["labels"].tolist() == [1]  # the 0.3 box is below τ
        assert torch.allclose(t["boxes"], torch.tensor([[44.0, 20.0, 54.0, 30.0]]), atol=1e-4)
    # and the projected box really covers the same pixels: draw it in the input, read it in both views
    marked = torch.zeros(1, 1, 64, 64)
    marked[..., 20:30, 44:54] = 1.0  # the object in input coordinates (the weak view flips it to x 10..20)
    weak = random_view(marked, ViewConfig(flip_p=1.0))
    assert weak.images[0, 0, 20:30, 10:20].mean() > 0.99


def test_stac_keeps_only_boxes_at_or_above_the_threshold():
    records = {7: {"boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6]]),
                   "scores": torch.tensor([0.95, 0.89, 0.9]), "labels": torch.tensor([0, 1, 2])},
               8: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}}
    kept = pseudo_targets(records, [7, 8], threshold=0.9)
    assert kept[0]["labels"].tolist() == [0, 2] and "scores" not in kept[0]
    assert kept[1]["boxes"].shape == (0, 4)
    assert pseudo_targets(records, [7], threshold=0.5)[0]["labels"].tolist() == [0, 1, 2]


def test_cam_boxes_enclose_the_activated_blob_and_score_by_probability():
    cams = torch.zeros(2, 64, 64)
    cams[0, 10:20, 30:40] = 5.0  # class 0: one blob
    cams[0, 50:52, 2:4] = 0.5    # a faint spot below the 20 % threshold
    probs = torch.tensor([0.8, 0.6])  # class 1: a flat map -> nothing to localise
    det = cam_boxes(cams, probs, threshold=0.2)
    assert det["labels"].tolist() == [0]
    assert det["boxes"].tolist() == [[30.0, 10.0, 40.0, 20.0]]
    assert det["scores"].tolist() == pytest.approx([0.8])
    cams[0, 50:52, 2:4] = 2.0  # now above 20 % of the range: a second, weaker region
    det = cam_boxes(cams, probs, threshold=0.2)
    assert det["boxes"].tolist() == [[30.0, 10.0, 40.0, 20.0], [2.0, 50.0, 4.0, 52.0]]
    assert det["scores"].tolist() == pytest.approx([0.8, 0.8 * 0.4])


def test_soft_teacher_weights_negatives_by_teacher_background_score():
    model = _tiny_detector()
    out = model(torch.rand(1, 1, 64, 64))
    targets = [{"boxes": torch.tensor([[16.0, 16.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    plain = model.loss(out, targets)["cls"]
    constant = soft_teacher_cls_loss(model, out, targets, torch.full((1, out.anchors.shape[0]), 0.3))
    assert constant.item() == pytest.approx(plain.item(), rel=1e-5)
    # the student's most confident negatives: if the teacher calls them background they cost more
    m = model.match(out, targets)[0]
    negative = ~m.positive & ~m.ignore
    confidence = torch.sigmoid(out.cls_logits[0]).amax(-1).detach()
    top = torch.where(negative, confidence, torch.full_like(confidence, -1.0)).topk(20).indices
    agree_background = torch.full((1, out.anchors.shape[0]), 0.1)
    agree_background[0, top] = 1.0
    suspect_object = torch.full((1, out.anchors.shape[0]), 1.0)
    suspect_object[0, top] = 0.0
    high = soft_teacher_cls_loss(model, out, targets, agree_background)
    low = soft_teacher_cls_loss(model, out, targets, suspect_object)
    assert high.item() > plain.item() > low.item()


def test_pi_model_consistency_and_ramp_up():
    a = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    assert consistency_loss(a, a.clone()).item() == 0.0
    b = torch.tensor([[0.4, 0.8], [0.5, 0.1]])
    assert consistency_loss(a, b).item() == pytest.approx(((0.2**2) / 2 + (0.4**2) / 2) / 2)
    assert consistency_loss(a, b, mask=torch.tensor([1.0, 0.0])).item() == pytest.approx(0.2**2 / 2)
    b.requires_grad_(True)
    a.requires_grad_(True)
    consistency_loss(a, b).backward()
    assert b.grad is None and a.grad.abs().sum() > 0  # the target side is not trained
    assert ramp_up(0, 10) == pytest.approx(math.exp(-5)) and ramp_up(5, 10) == pytest.approx(math.exp(-1.25))
    assert ramp_up(10, 10) == 1.0 and ramp_up(3, 0) == 1.0


def test_temporal_ensembling_accumulates_with_startup_correction():
    ens = EnsembleTargets([11, 12], num_classes=2, alpha=0.6)
    _, has = ens.targets(torch.tensor([11, 12]))
    assert has.tolist() == [False, False]  # no target before an image was seen
    p1, p2 = torch.tensor([[0.2, 1.0]]), torch.tensor([[0.6, 0.0]])
    ens.update(torch.tensor([11]), p1)
    target, has = ens.targets(torch.tensor([11, 12]))
    assert has.tolist() == [True, False]
    assert torch.allclose(target[0], p1[0])  # 0.4 p1 / (1 - 0.6)
    ens.update(torch.tensor([11]), p2)
    expected = (0.6 * 0.4 * p1[0] + 0.4 * p2[0]) / (1 - 0.6**2)
    assert torch.allclose(ens.targets(torch.tensor([11]))[0][0], expected)
    restored = EnsembleTargets([11, 12], 2, 0.6)
    restored.load_state_dict(ens.state_dict())
    assert torch.equal(restored.Z, ens.Z) and restored.seen.tolist() == [2, 0]


def test_multitask_detection_loss_only_on_box_images_and_image_loss_only_where_labeled():
    model = MultiTaskDetector(_tiny_detector()).eval()  # BatchNorm on running statistics: batches comparable
    images = torch.rand(2, 1, 64, 64)
    targets = [{"boxes": torch.tensor([[16.0, 16.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    both = multitask_losses(model, images, targets, torch.tensor([True, False]), labels, torch.tensor([True, True]), 1.0)
    first = multitask_losses(model, images[:1], targets[:1], torch.tensor([True]), labels[:1], torch.tensor([True]), 1.0)
    assert both["cls"].item() == pytest.approx(first["cls"].item(), rel=1e-4)  # image 2 adds no detection loss
    no_weak = multitask_losses(model, images, targets, torch.tensor([True, False]), labels, torch.tensor([True, False]), 1.0)
    assert no_weak["image"].item() == pytest.approx(first["image"].item(), rel=1e-4)
    assert both["image"].item() != pytest.approx(first["image"].item(), rel=1e-4)
