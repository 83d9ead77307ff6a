"""Geometry-recording views: warped pixels and projected boxes agree; matrices invert and compose."""

from __future__ import annotations

import pytest
import torch

from cxrdistill.data.views import (
    ViewConfig,
    compose,
    homography_from_points,
    intensity_jitter,
    invert,
    project_boxes,
    random_affine,
    random_view,
    transform_points,
    warp_images,
)

SIZE = (64, 80)  # (H, W): not square, so width/height mix-ups show


def _rectangle_image(box: list[int], size: tuple[int, int] = SIZE) -> torch.Tensor:
    """``(1, 1, H, W)``: zeros with ones inside the integer ``xyxy`` box."""
    image = torch.zeros(1, 1, *size)
    x0, y0, x1, y1 = box
    image[..., y0:y1, x0:x1] = 1.0
    return image


def _bright_bbox(image: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``xyxy`` bounding box of the pixels above ``threshold`` in ``(H, W)``."""
    ys, xs = torch.nonzero(image > threshold, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


@pytest.mark.parametrize("perspective", [0.0, 0.2])
def test_projected_box_matches_warped_rectangle(perspective: float) -> None:
    generator = torch.Generator().manual_seed(0)
    box = [22, 18, 52, 40]
    image = _rectangle_image(box)
    for _ in range(8):
        matrix = random_affine(1, image_size=SIZE, flip_p=0.5, rotate_deg=25, translate=0.1,
                               scale=(0.9, 1.1), perspective=perspective, generator=generator)
        warped = warp_images(image, matrix)[0, 0]
        projected, keep = project_boxes(torch.tensor([box], dtype=torch.float32), matrix[0], SIZE)
        assert keep.tolist() == [True]
        assert torch.allclose(projected[0], _bright_bbox(warped), atol=2.0), (projected, matrix)


def test_translation_moves_pixels_exactly() -> None:
    matrix = torch.eye(3).unsqueeze(0)
    matrix[0, 0, 2], matrix[0, 1, 2] = 5.0, -3.0
    image = torch.rand(1, 1, *SIZE)
    warped = warp_images(image, matrix)
    torch.testing.assert_close(warped[0, 0, 0:61, 5:], image[0, 0, 3:64, :75])
    assert warped[0, 0, :, :5].abs().max() == 0  # uncovered area is zero


def test_flip_twice_is_identity() -> None:
    flip = random_affine(2, image_size=SIZE, flip_p=1.0)
    assert flip[0, 0, 0] == -1  # it did flip
    image = torch.rand(2, 1, *SIZE)
    once = warp_images(image, flip)
    torch.testing.assert_close(once, image.flip(-1))
    torch.testing.assert_close(warp_images(once, flip), image)
    torch.testing.assert_close(compose(flip, flip), torch.eye(3).expand(2, 3, 3))


def test_invert_and_compose_give_identity() -> None:
    generator = torch.Generator().manual_seed(1)
    matrices = random_affine(4, image_size=SIZE, flip_p=0.5, rotate_deg=30, translate=0.2,
                             scale=(0.8, 1.2), perspective=0.2, generator=generator)
    assert matrices.shape == (4, 3, 3) and matrices.dtype == torch.float32
    eye = torch.eye(3).expand(4, 3, 3)
    # float32 matrices with translations of tens of pixels: 1e-4 px is exact enough
    torch.testing.assert_close(compose(matrices, invert(matrices)), eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(compose(invert(matrices), matrices), eye, atol=1e-4, rtol=0)
    points = torch.tensor([[3.0, 4.0], [70.0, 10.0]])
    there = transform_points(points, matrices[0])
    torch.testing.assert_close(transform_points(there, invert(matrices)[0]), points, atol=1e-3,
                               rtol=0)


def test_compose_applies_first_argument_first() -> None:
    shift = torch.eye(3)
    shift[0, 2] = 10.0
    double = torch.diag(torch.tensor([2.0, 2.0, 1.0]))
    point = torch.tensor([[1.0, 1.0]])
    assert transform_points(point, compose(shift, double)).tolist() == [[22.0, 2.0]]
    assert transform_points(point, compose(double, shift)).tolist() == [[12.0, 2.0]]


def test_homography_maps_the_four_points() -> None:
    source = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [10.0, 8.0], [0.0, 8.0]]], dtype=torch.float64)
    target = torch.tensor([[[1.0, 2.0], [9.0, 1.0], [11.0, 7.0], [0.5, 9.0]]], dtype=torch.float64)
    matrix = homography_from_points(source, target)[0]
    torch.testing.assert_close(transform_points(source[0], matrix), target[0])
    assert matrix[2, :2].abs().sum() > 0  # genuinely projective


def test_boxes_pushed_outside_are_dropped_with_their_mask() -> None:
    shift = torch.eye(3)
    shift[0, 2] = 50.0  # move right by 50 px in an 80 px wide image
    boxes = torch.tensor([[2.0, 2.0, 12.0, 12.0],   # lands at 52..62: kept whole
                          [20.0, 5.0, 40.0, 15.0],  # 70..90: half outside, exactly at the limit
                          [25.0, 5.0, 45.0, 15.0],  # 75..95: 25 % inside: dropped
                          [60.0, 5.0, 70.0, 15.0]])  # fully outside: dropped
    labels = torch.tensor([0, 1, 2, 3])
    kept, keep = project_boxes(boxes, shift, SIZE)
    assert keep.tolist() == [True, True, False, False]
    assert labels[keep].tolist() == [0, 1]
    torch.testing.assert_close(kept, torch.tensor([[52.0, 2.0, 62.0, 12.0], [70.0, 5.0, 80.0, 15.0]]))
    empty, mask = project_boxes(torch.zeros(0, 4), shift, SIZE)
    assert empty.shape == (0, 4) and mask.shape == (0,)


def test_intensity_jitter_changes_images_within_range_and_is_reproducible() -> None:
    images = torch.rand(3, 1, 32, 32)
    assert intensity_jitter(images, 0.0) is images
    first = intensity_jitter(images, 1.0, torch.Generator().manual_seed(3))
    second = intensity_jitter(images, 1.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, second)
    assert first.min() >= 0 and first.max() <= 1
    assert (first - images).abs().mean() > 0.02


def test_blur_smooths_noise() -> None:
    from cxrdistill.data.views import _gaussian_blur

    images = torch.rand(2, 1, 32, 32)
    blurred = _gaussian_blur(images, torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(blurred[0], images[0])  # sigma 0: unchanged
    assert blurred[1].std() < 0.5 * images[1].std()
    assert blurred[1].mean() == pytest.approx(images[1].mean().item(), abs=0.02)


def test_weak_into_strong_carries_teacher_boxes() -> None:
    generator = torch.Generator().manual_seed(7)
    box = [20, 16, 44, 36]
    images = _rectangle_image(box).repeat(3, 1, 1, 1)
    boxes = [torch.tensor([box], dtype=torch.float32)] * 3
    labels = [torch.tensor([1])] * 3
    geometry_only = ViewConfig(flip_p=0.5, rotate_deg=25.0, translate=0.1, scale=(0.9, 1.1),
                               perspective=0.2)
    weak = random_view(images, ViewConfig.weak(), generator, boxes, labels)
    strong = random_view(images, geometry_only, generator, boxes, labels)
    assert weak.images.shape == strong.images.shape == (3, 1, *SIZE)
    for i in range(3):
        teacher_boxes = _bright_bbox(weak.images[i, 0])[None]  # what a teacher would find
        student_boxes, keep = project_boxes(teacher_boxes, weak.into(strong)[i], SIZE)
        assert keep.all()
        truth = _bright_bbox(strong.images[i, 0])
        assert torch.allclose(student_boxes[0], truth, atol=2.5)
        assert torch.allclose(strong.boxes[i][0], truth, atol=2.0)
        assert weak.keep[i].tolist() == [True] and strong.labels[i].tolist() == [1]


def test_random_view_strong_intensity_and_presets() -> None:
    images = torch.rand(2, 1, 32, 32)
    strong = ViewConfig.martins_silva()
    assert (strong.rotate_deg, strong.translate, strong.scale, strong.perspective) == (
        25.0, 0.15, (0.9, 1.1), 0.2)
    generator = torch.Generator().manual_seed(0)
    weak = random_view(images, ViewConfig(), generator)
    view = random_view(images, strong, generator)
    torch.testing.assert_close(weak.images, images, atol=1e-5, rtol=0)  # identity geometry
    assert weak.boxes is None
    assert view.images.min() >= 0 and view.images.max() <= 1


# Outputs of the four augmentation paths random_view replaced (kit.augment_batch with the flip,
# strong and flip_shift views, offline.random_view, aals.random_view), recorded from them on this
# seeded input before the refactor: random_view must draw the same numbers in the same order
# (the generator's next draw agrees exactly) and give the same views.
_REFERENCE = {
    "flip": (ViewConfig.weak(), [1530.0144, 0.740253, 0.285303],
             [[[12.0, 3.0, 30.0, 25.0], [0.0, 28.0, 4.0, 31.0]], [], [[23.0, 5.0, 27.0, 9.0]]], 0.8189664483070374),
    "strong": (ViewConfig.martins_silva(), [1108.64795, 0.341824, 0.714963],
               [[[12.900164604187012, 0.0, 32.0, 21.51738739013672],
                 [7.635995388031006, 26.571636199951172, 12.957167625427246, 30.76920509338379]], [],
                [[28.416845321655273, 8.970601081848145, 32.0, 14.123291969299316]]], 0.6878734827041626),
    "flip_shift": (ViewConfig(flip_p=0.5, translate=0.1), [1349.28345, 0.776932, 0.719361],
                   [[[14.909629821777344, 0.1693875789642334, 32.0, 22.169387817382812],
                     [1.9096298217773438, 25.169387817382812, 6.909629821777344, 28.169387817382812]], [],
                    [[25.567123413085938, 5.400673866271973, 29.567123413085938, 9.400673866271973]]],
                   0.8189664483070374),
    "aals": (ViewConfig(flip_p=0.5, rotate_deg=10.0, contrast=0.2, brightness=0.1), [1484.65894, 0.095886, 0.698551],
             [[[10.370429039001465, 1.3164410591125488, 31.035961151123047, 25.437620162963867],
               [0.674105167388916, 29.43601417541504, 6.016688346862793, 32.0]], [],
              [[24.04121208190918, 6.2788190841674805, 28.636192321777344, 10.873798370361328]]],
             0.19465243816375732),
}


@pytest.mark.parametrize("name", sorted(_REFERENCE))
def test_random_view_equals_the_frozen_reference_of_the_paths_it_replaced(name: str) -> None:
    from cxrdistill.data.views import random_view
    from cxrdistill.methods.kit import step_generator

    cfg, stats, boxes_out, next_draw = _REFERENCE[name]
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    boxes = [torch.tensor([[2.0, 3, 20, 25], [28, 28, 33, 31]]), torch.zeros(0, 4), torch.tensor([[5.0, 5, 9, 9]])]
    labels = [torch.tensor([0, 1]), torch.zeros(0, dtype=torch.long), torch.tensor([1])]
    generator = step_generator(3, 5, 1)
    view = random_view(images, cfg, generator, boxes, labels)
    assert torch.rand(1, generator=generator).item() == next_draw  # the same draws, in the same order
    x = view.images
    assert [float(x.sum()), float(x[0, 0, 5, 7]), float(x[2, 0, 17, 30])] == pytest.approx(stats, abs=2e-5)
    for got, want in zip(view.boxes, boxes_out, strict=True):
        torch.testing.assert_close(got, torch.tensor(want).reshape(-1, 4), atol=1e-5, rtol=0)
    assert [lab.tolist() for lab in view.labels] == [[0, 1], [], [1]]
    assert [t["labels"].tolist() for t in view.targets] == [[0, 1], [], [1]]


def test_random_view_none_is_the_identity_and_draws_nothing() -> None:
    from cxrdistill.data.views import random_view

    images = torch.rand(2, 1, 16, 16)
    generator = torch.Generator().manual_seed(1)
    boxes = [torch.tensor([[1.0, 1, 5, 5]]), torch.zeros(0, 4)]
    view = random_view(images, None, generator, boxes, [torch.tensor([0]), torch.zeros(0, dtype=torch.long)])
    assert view.images is images and torch.equal(view.matrices, torch.eye(3).expand(2, 3, 3))
    assert view.boxes[0] is boxes[0] and view.keep[0].tolist() == [True]
    assert torch.rand(1, generator=generator).item() == torch.rand(1, generator=torch.Generator().manual_seed(1)).item()
