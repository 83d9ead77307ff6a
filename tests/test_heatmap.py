"""HeatmapFPN: shapes, box rasterisation, weighted BCE, overfitting, maps -> detections."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cxrdistill.models.heatmap import HeatmapFPN, boxes_to_masks, image_scores, maps_to_detections, pixel_bce_loss


def tiny_heatmap(num_classes: int = 2, **kwargs) -> HeatmapFPN:
    torch.manual_seed(0)
    return HeatmapFPN(num_classes=num_classes, base_width=8, fpn_channels=32, **kwargs)


def squares(size: int = 64) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """4 noise images; squares of class 0 are bright (0.9), of class 1 grey (0.55); image 3 is empty."""
    g = torch.Generator().manual_seed(0)
    images = 0.2 + 0.05 * torch.randn(4, 1, size, size, generator=g)
    boxes = [
        torch.tensor([[8.0, 8, 24, 24]]),
        torch.tensor([[36.0, 12, 56, 32], [8, 40, 24, 56]]),
        torch.tensor([[28.0, 28, 44, 44]]),
        torch.zeros(0, 4),
    ]
    labels = [torch.tensor([0]), torch.tensor([1, 0]), torch.tensor([1]), torch.zeros(0, dtype=torch.long)]
    for i, (bs, ls) in enumerate(zip(boxes, labels)):
        for (x1, y1, x2, y2), label in zip(bs.long().tolist(), ls.tolist()):
            images[i, 0, y1:y2, x1:x2] = 0.9 if label == 0 else 0.55
    return images.clamp(0, 1), boxes, labels


def test_output_shapes_per_stride():
    images = torch.rand(2, 1, 64, 64)
    assert tiny_heatmap(3)(images).shape == (2, 3, 16, 16)
    assert tiny_heatmap(3, output_stride=8)(images).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="output_stride"):
        tiny_heatmap(output_stride=2)


def test_boxes_to_masks_marks_cells_whose_centre_is_inside():
    masks = boxes_to_masks(
        [torch.tensor([[8.0, 8, 24, 16], [1, 1, 2, 2]]), torch.zeros(0, 4)],
        [torch.tensor([1, 0]), torch.zeros(0, dtype=torch.long)],
        num_classes=2,
        height=32,
        width=32,
        stride=4,
    )
    assert masks.shape == (2, 2, 8, 8)
    expected = torch.zeros(8, 8)
    expected[2:4, 2:6] = 1  # cell centres 10, 14 (rows) and 10..22 (columns) lie in the box
    assert torch.equal(masks[0, 1], expected)
    tiny = torch.zeros(8, 8)
    tiny[0, 0] = 1  # a box smaller than a cell still marks the cell holding its centre
    assert torch.equal(masks[0, 0], tiny)
    assert masks[1].sum() == 0
    soft = boxes_to_masks(
        [torch.tensor([[0.0, 0, 16, 16], [8, 8, 24, 24]])], [torch.tensor([0, 0])], 1, 32, 32, 8,
        scores_list=[torch.tensor([0.3, 0.6])],
    )
    expected_soft = torch.tensor([[0.3, 0.3, 0, 0], [0.3, 0.6, 0.6, 0], [0, 0.6, 0.6, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(soft[0, 0], expected_soft)


def test_pixel_bce_loss_weights_select_images():
    logits = torch.randn(2, 2, 4, 4)
    masks = (torch.rand(2, 2, 4, 4) > 0.5).float()
    torch.testing.assert_close(pixel_bce_loss(logits, masks), F.binary_cross_entropy_with_logits(logits, masks))
    torch.testing.assert_close(
        pixel_bce_loss(logits, masks, weights=torch.tensor([0.0, 3.0])),
        F.binary_cross_entropy_with_logits(logits[1], masks[1]),
    )
    with pytest.raises(ValueError, match="must match"):
        pixel_bce_loss(logits, masks[:, :1])


def test_overfits_four_images():
    images, boxes, labels = squares()
    model = tiny_heatmap()
    masks = boxes_to_masks(boxes, labels, 2, 64, 64, model.output_stride)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = pixel_bce_loss(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(images))
    inside = masks > 0
    # pixels at least one cell away from every box of their class
    outside = F.max_pool2d(masks, kernel_size=3, stride=1, padding=1) == 0
    for b in range(4):
        for c in range(2):
            if inside[b, c].any():
                assert probs[b, c][inside[b, c]].max() > 0.8
            assert probs[b, c][outside[b, c]].max() < 0.2
    scores = image_scores(model(images).detach())
    assert (scores > 0.5).tolist() == [[True, False], [True, True], [False, True], [False, False]]


def test_image_scores_is_max_probability():
    logits = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(image_scores(logits), torch.sigmoid(logits).amax(dim=(2, 3)))


def test_maps_to_detections_boxes_connected_regions():
    probs = torch.zeros(2, 2, 8, 8)
    probs[0, 1, 1:3, 2:5] = 0.7
    probs[0, 1, 2, 3] = 0.9
    probs[0, 1, 6, 6] = 0.6
    probs[0, 0, 5:7, 0:2] = 0.4  # below the threshold
    detections = maps_to_detections(probs, threshold=0.5, stride=4)
    first = detections[0]
    assert first["boxes"].tolist() == [[8.0, 4, 20, 12], [24, 24, 28, 28]]
    torch.testing.assert_close(first["scores"], torch.tensor([0.9, 0.6]))
    assert first["labels"].tolist() == [1, 1]
    assert detections[1]["boxes"].shape == (0, 4) and detections[1]["labels"].dtype == torch.long
