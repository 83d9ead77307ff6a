"""RetinaNet: shapes, matching, losses (soft targets, empty images, weights), decoding, overfitting."""

from __future__ import annotations

import pytest
import torch
from monai.data.box_utils import non_max_suppression

from cxrdistill.models.detector import RetinaNet, batched_nms_sorted, match_anchors
from cxrdistill.models.losses import pairwise_box_iou


def tiny_detector(num_classes: int = 2, **kwargs) -> RetinaNet:
    torch.manual_seed(0)
    settings = dict(
        base_width=8,
        fpn_channels=32,
        fpn_levels=(2, 3, 4),
        anchor_sizes=((12,), (24,), (48,)),
        aspect_ratios=(1.0,),
        head_convs=2,
    )
    settings.update(kwargs)
    return RetinaNet(num_classes=num_classes, **settings)


def make_squares(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """Noise images with 1-2 non-touching squares; class 0 is bright (0.9), class 1 grey (0.55)."""
    g = torch.Generator().manual_seed(seed)
    images = 0.2 + 0.05 * torch.randn(n, 1, size, size, generator=g)
    targets = []
    for i in range(n):
        boxes: list[torch.Tensor] = []
        labels = []
        for j in range(1 + i % 2):
            while True:
                s = int(torch.randint(10, 22, (1,), generator=g))
                x, y = (int(v) for v in torch.randint(2, size - s - 2, (2,), generator=g))
                box = torch.tensor([x, y, x + s, y + s], dtype=torch.float32)
                grown = box + torch.tensor([-3.0, -3.0, 3.0, 3.0])
                if not boxes or pairwise_box_iou(grown[None], torch.stack(boxes)).max() == 0:
                    break
            label = (i + j) % 2
            images[i, 0, y : y + s, x : x + s] = 0.9 if label == 0 else 0.55
            boxes.append(box)
            labels.append(label)
        targets.append({"boxes": torch.stack(boxes), "labels": torch.tensor(labels)})
    return images.clamp(0, 1), targets


def mean_ap50(detections: list[dict], targets: list[dict], num_classes: int) -> float:
    """VOC-style all-point AP at IoU 0.5, averaged over classes."""
    aps = []
    for c in range(num_classes):
        ranked, num_gt = [], 0
        for det, tgt in zip(detections, targets):
            gt = tgt["boxes"][tgt["labels"] == c]
            num_gt += len(gt)
            used = torch.zeros(len(gt), dtype=torch.bool)
            mine = det["labels"] == c
            for box, score in zip(det["boxes"][mine], det["scores"][mine]):
                hit = False
                if len(gt):
                    iou = pairwise_box_iou(box[None], gt)[0].masked_fill(used, -1)
                    j = int(iou.argmax())
                    hit = bool(iou[j] >= 0.5)
                    used[j] |= hit
                ranked.append((float(score), hit))
        ranked.sort(key=lambda r: -r[0])
        hits = torch.tensor([h for _, h in ranked], dtype=torch.float32)
        tp = hits.cumsum(0)
        precision = tp / torch.arange(1, len(hits) + 1)
        recall = tp / max(num_gt, 1)
        ap, prev_recall = 0.0, 0.0
        for k in range(len(hits)):
            if hits[k]:
                ap += float(recall[k] - prev_recall) * float(precision[k:].max())
                prev_recall = float(recall[k])
        aps.append(ap)
    return sum(aps) / num_classes


def test_forward_shapes_and_anchor_layout():
    model = tiny_detector(num_classes=3)
    out = model(torch.rand(2, 1, 64, 64))
    assert out.level_sizes == [(16, 16), (8, 8), (4, 4)]
    assert out.anchors_per_location == 1
    num_anchors = 16 * 16 + 8 * 8 + 4 * 4
    assert out.cls_logits.shape == (2, num_anchors, 3)
    assert out.box_deltas.shape == (2, num_anchors, 4)
    assert out.anchors.shape == (num_anchors, 4)
    assert out.backbone_feature.shape == (2, 64, 2, 2)
    assert [tuple(f.shape) for f in out.fpn_features] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4)]
    assert out.image_size == (64, 64)
    # anchor (y, x, k) of level 0 sits at flat index (y * w + x) * K + k, centred at (i + 0.5) * stride
    y, x = 3, 5
    assert out.anchors[y * 16 + x].tolist() == [x * 4 + 2 - 6, y * 4 + 2 - 6, x * 4 + 2 + 6, y * 4 + 2 + 6]
    views = out.level_views(out.cls_logits)
    assert [tuple(v.shape) for v in views] == [(2, 16, 16, 1, 3), (2, 8, 8, 1, 3), (2, 4, 4, 1, 3)]
    assert torch.equal(views[1][1, 2, 3, 0], out.cls_logits[1, 256 + 2 * 8 + 3])
    assert model(torch.rand(1, 1, 64, 64)).anchors is out.anchors  # cached per size


def test_default_retinanet_layout():
    model = RetinaNet(num_classes=2, base_width=8, fpn_channels=16, head_convs=1)
    out = model(torch.rand(1, 1, 128, 128))
    assert out.level_sizes == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]  # P3..P7
    assert out.anchors_per_location == 9
    assert out.cls_logits.shape == (1, 9 * (256 + 64 + 16 + 4 + 1), 2)


def test_match_anchors_positive_ignore_and_low_quality():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 14], [0, 0, 20, 20], [50, 50, 60, 60]])
    boxes = torch.tensor([[0.0, 0, 10, 12], [40, 40, 70, 70]])
    m = match_anchors(anchors, boxes, fg_iou_thresh=0.5, bg_iou_thresh=0.3)
    # IoUs with box 0: 0.833, 0.857, 0.3, 0; anchor 3 has IoU 1/9 with box 1 (its best, so low-quality match)
    assert m.positive.tolist() == [True, True, False, True]
    assert m.matched_idx.tolist() == [0, 0, -1, 1]
    assert m.ignore.tolist() == [False, False, True, False]
    strict = match_anchors(anchors, boxes, allow_low_quality_matches=False)
    assert strict.positive.tolist() == [True, True, False, False]
    empty = match_anchors(anchors, torch.zeros(0, 4))
    assert not empty.positive.any() and not empty.ignore.any() and (empty.matched_idx == -1).all()


def test_overfits_four_images():
    images, targets = make_squares(4)
    model = tiny_detector()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        parts = model.loss(model(images), targets)
        total = parts["cls"] + parts["box"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert losses[-1] < 0.05 * losses[0]
    assert mean_ap50(model.predict(images), targets, num_classes=2) >= 0.9
    assert model.training  # predict restores the mode


@pytest.mark.parametrize("matcher, box_loss", [("iou", "smooth_l1"), ("atss", "giou")])
def test_soft_targets_equal_hard_when_scores_are_one(matcher, box_loss):
    images, targets = make_squares(2, seed=1)
    model = tiny_detector(matcher=matcher, box_loss=box_loss)
    out = model(images)
    hard = model.loss(out, targets)
    ones = model.loss(out, [dict(t, scores=torch.ones(len(t["labels"]))) for t in targets])
    torch.testing.assert_close(ones["cls"], hard["cls"])
    torch.testing.assert_close(ones["box"], hard["box"])
    assert hard["box"] > 0 and sum(int(m.positive.sum()) for m in model.match(out, targets)) >= 3
    half = model.loss(out, [dict(t, scores=torch.full((len(t["labels"]),), 0.5)) for t in targets])
    assert half["cls"] < hard["cls"]  # the untrained head is closer to a 0.5 target than to 1
    torch.testing.assert_close(half["box"], 0.5 * hard["box"])  # box loss weighted by score


def test_images_without_boxes_train_without_nan():
    images = torch.rand(2, 1, 64, 64)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    model = tiny_detector()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    first = None
    for _ in range(3):
        parts = model.loss(model(images), empty)
        assert torch.isfinite(parts["cls"]) and parts["cls"] > 0
        assert parts["box"] == 0
        optimizer.zero_grad()
        (parts["cls"] + parts["box"]).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        first = parts["cls"].item() if first is None else first
    assert parts["cls"].item() < first


def test_image_weights_and_ignored_boxes():
    images, targets = make_squares(2, seed=2)
    model = tiny_detector().eval()  # eval: batch statistics must not couple the images
    out = model(images)
    only_first = model.loss(model(images[:1]), targets[:1])
    weighted = model.loss(out, targets, weights=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(weighted["cls"], only_first["cls"])
    torch.testing.assert_close(weighted["box"], only_first["box"])
    ignored = [dict(t, ignore=torch.ones(len(t["labels"]), dtype=torch.bool)) for t in targets]
    matches = model.match(out, ignored)
    assert all(not m.positive.any() and m.ignore.any() for m in matches)
    assert model.loss(out, ignored)["box"] == 0


def test_bad_targets_name_the_image():
    model = tiny_detector()
    out = model(torch.rand(2, 1, 64, 64))
    good = {"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match="target 1: labels"):
        model.loss(out, [good, {"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([5])}])
    with pytest.raises(ValueError, match="target 0: every box"):
        model.loss(out, [{"boxes": torch.tensor([[9.0, 1, 1, 9]]), "labels": torch.tensor([0])}, good])


def test_decode_caps_and_sorts_detections():
    model = tiny_detector(num_classes=3)
    out = model(torch.rand(2, 1, 64, 64))
    detections = model.decode(out, score_thresh=0.0, nms_thresh=0.9, max_detections=7)
    for det in detections:
        assert 0 < len(det["boxes"]) <= 7
        assert det["boxes"].shape == (len(det["scores"]), 4) and det["labels"].dtype == torch.long
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
        assert det["boxes"].min() >= 0 and det["boxes"].max() <= 64
    assert all(len(d["boxes"]) == 0 for d in model.decode(out, score_thresh=0.999))


def test_batched_nms_equals_greedy_nms_per_class():
    g = torch.Generator().manual_seed(3)
    batch, k = 3, 60
    xy = torch.rand(batch, k, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + 5 + torch.rand(batch, k, 2, generator=g) * 20], dim=-1)
    scores = torch.rand(batch, k, generator=g).sort(dim=1, descending=True).values
    labels = torch.randint(0, 2, (batch, k), generator=g)
    valid = scores > 0.1
    keep = batched_nms_sorted(boxes, labels, valid, iou_thresh=0.4)
    for b in range(batch):
        expected = torch.zeros(k, dtype=torch.bool)
        for c in range(2):
            idx = torch.nonzero(valid[b] & (labels[b] == c)).flatten()
            expected[idx[non_max_suppression(boxes[b, idx], scores[b, idx], 0.4)]] = True
        assert torch.equal(keep[b], expected)


def test_frozen_batchnorm_keeps_running_statistics():
    model = tiny_detector(freeze_bn=True)
    bn = model.backbone.body.bn1
    before = bn.running_mean.clone()
    images, targets = make_squares(2)
    parts = model.loss(model(images), targets)
    (parts["cls"] + parts["box"]).backward()
    assert model.training and not bn.training
    assert torch.equal(bn.running_mean, before) and bn.weight.grad is None
    assert model.backbone.body.conv1.weight.grad is not None
