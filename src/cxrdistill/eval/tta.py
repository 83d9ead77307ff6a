"""Ten-crop test-time augmentation (Martins & Silva, Sec. IV-C).

"We produce ten 224x224 different crops from the original image, taking the four corners and the
central crop, plus the horizontally flipped version of these, and making an independent
prediction for each crop. The final prediction for the given image is the average of the ten
crop predictions." Their images were 256 px, so a crop covers 224 / 256 = 0.875 of each side
(`DEFAULT_CROP_FRACTION`). The model must accept the smaller crop (any network ending in global
pooling does).

:func:`predict_with_tta` applies it (or not) to one batch; :func:`predict_dataset` to every image of
a dataset, in dataset order.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from typing import Any, Protocol

import torch
from torch import Tensor

Predict = Callable[[Tensor], Tensor]
"""``predict(images (B, C, h, w)) -> (B, K)`` per-image outputs, e.g. class probabilities."""


class ImageDataset(Sized, Protocol):
    def __getitem__(self, index: int) -> dict[str, Any]: ...

DEFAULT_CROP_FRACTION = 224 / 256


def crop_size_for(image_size: int, crop_fraction: float = DEFAULT_CROP_FRACTION) -> int:
    """Side of the crops for `image_size` px images: `round(image_size * crop_fraction)`, at least 1."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must lie in (0, 1], got {crop_fraction}")
    return max(1, round(image_size * crop_fraction))


def ten_crop(images: Tensor, crop: int) -> Tensor:
    """The ten crops of `images (B, C, H, W)`: `(10, B, C, crop, crop)`.

    Order: top-left, top-right, bottom-left, bottom-right, centre, then the same five of the
    horizontally flipped image (flipping a crop equals cropping the mirrored position of the
    flipped image, so the flipped five are the flips of the first five).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if not 0 < crop <= min(height, width):
        raise ValueError(f"crop {crop} does not fit images of {height}x{width}")
    top, left = (height - crop) // 2, (width - crop) // 2
    corners = [(0, 0), (0, width - crop), (height - crop, 0), (height - crop, width - crop), (top, left)]
    five = [images[..., y:y + crop, x:x + crop] for y, x in corners]
    return torch.stack(five + [c.flip(-1) for c in five])


def ten_crop_predict(predict: Callable[[Tensor], Tensor], images: Tensor,
                     crop_fraction: float = DEFAULT_CROP_FRACTION) -> Tensor:
    """Mean of `predict` over the ten crops of `images (B, C, H, W)`.

    `predict` maps a batch of crops `(10B, C, h, w)` to per-image outputs `(10B, K)` (e.g. class
    probabilities: average probabilities, not logits, as the paper does). Returns `(B, K)`.
    """
    crops = ten_crop(images, crop_size_for(min(images.shape[-2:]), crop_fraction))
    n_views, batch = crops.shape[:2]
    out = predict(crops.reshape(n_views * batch, *crops.shape[2:]))
    return out.reshape(n_views, batch, *out.shape[1:]).mean(dim=0)


def predict_with_tta(predict: Predict, images: Tensor, *, tta: bool,
                     crop_fraction: float = DEFAULT_CROP_FRACTION) -> Tensor:
    """``predict(images)`` ``(B, K)``, or with ``tta`` its mean over the ten crops (:func:`ten_crop_predict`)."""
    return ten_crop_predict(predict, images, crop_fraction) if tta else predict(images)


@torch.no_grad()
def predict_dataset(predict: Predict, dataset: ImageDataset, *, tta: bool, num_outputs: int,
                    crop_fraction: float = DEFAULT_CROP_FRACTION, batch_size: int = 32,
                    device: torch.device | None = None) -> tuple[list[int], Tensor]:
    """Image ids and outputs ``(N, K)`` float32 on CPU of ``predict`` over ``dataset`` (samples with
    ``image (1, S, S)`` and ``image_id``), batch by batch, optionally with ten-crop TTA.

    ``predict`` runs as given: put the model in evaluation mode first.
    """
    ids: list[int] = []
    out: list[Tensor] = []
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([s["image"] for s in samples])
        images = images.to(device) if device is not None else images
        out.append(predict_with_tta(predict, images, tta=tta, crop_fraction=crop_fraction).float().cpu())
        ids += [int(s["image_id"]) for s in samples]
    return ids, torch.cat(out) if out else torch.zeros(0, num_outputs)


__all__ = ["DEFAULT_CROP_FRACTION", "Predict", "crop_size_for", "predict_dataset", "predict_with_tta", "ten_crop",
           "ten_crop_predict"]
