"""Ten-crop TTA (Martins & Silva, Sec. IV-C): the crops, their average, and dataset prediction."""

from __future__ import annotations

import pytest
import torch

from cxrdistill.eval.tta import predict_dataset, predict_with_tta, ten_crop, ten_crop_predict


def test_ten_crop_takes_corners_centre_and_their_flips():
    images = torch.arange(2 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    crops = ten_crop(images, 4)
    assert crops.shape == (10, 2, 1, 4, 4)
    assert torch.equal(crops[0], images[..., :4, :4]) and torch.equal(crops[3], images[..., 2:, 2:])
    assert torch.equal(crops[1], images[..., :4, 2:]) and torch.equal(crops[2], images[..., 2:, :4])
    assert torch.equal(crops[4], images[..., 1:5, 1:5])
    assert torch.equal(crops[5:], crops[:5].flip(-1))
    with pytest.raises(ValueError, match="does not fit"):
        ten_crop(images, 7)


def test_ten_crop_predict_averages_the_crop_predictions():
    images = torch.rand(3, 1, 8, 8)
    top_left = lambda x: x[:, :, 0, 0]
    out = ten_crop_predict(top_left, images, crop_fraction=0.75)  # 6 px crops
    corners = [images[:, :, y, x] for y, x in ((0, 0), (0, 2), (2, 0), (2, 2), (1, 1))]
    flipped = [images[:, :, y, x + 5] for y, x in ((0, 0), (0, 2), (2, 0), (2, 2), (1, 1))]
    assert torch.allclose(out, torch.stack(corners + flipped).mean(0))


def test_predict_with_tta_switches_between_the_plain_and_the_averaged_prediction():
    images = torch.zeros(2, 1, 4, 4)
    images[:, :, 0, 0] = 1.0  # one bright corner pixel: seen by some crops only
    predict = lambda x: x.amax(dim=(2, 3))  # (B, 1): 1 when the view contains the pixel
    assert predict_with_tta(predict, images, tta=False).tolist() == [[1.0], [1.0]]
    # 2 px crops: only the top-left crop and its mirror image contain it -> 2 of 10 views
    assert torch.allclose(predict_with_tta(predict, images, tta=True, crop_fraction=0.5), torch.full((2, 1), 0.2))


def test_predict_dataset_keeps_dataset_order_across_batches():
    samples = [{"image": torch.full((1, 4, 4), float(k)), "image_id": 10 + k} for k in range(5)]
    ids, out = predict_dataset(lambda x: x.mean(dim=(1, 2, 3))[:, None].repeat(1, 2), samples, tta=True,
                               num_outputs=2, batch_size=2)
    assert ids == [10, 11, 12, 13, 14]
    assert out.shape == (5, 2) and out[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    ids, out = predict_dataset(lambda x: x, [], tta=False, num_outputs=3)
    assert ids == [] and out.shape == (0, 3)
