"""CXR-appropriate augmentations for contrastive pretraining (MoCo-CXR): random resized crop of
modest scale, rotation of at most ±10°, horizontal flip, brightness / contrast; no colour jitter.

Every random draw comes from a ``torch.Generator`` the caller derives from ``(seed, step)``
(:func:`step_generator`), so a resumed run sees the same views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cxrdistill.data.views import compose, warp_images


@dataclass(frozen=True)
class CXRAugment:
    """Ranges of one random view."""

    crop_scale: tuple[float, float] = (0.6, 1.0)
    """Fraction of the image area the crop keeps (then resized back to the full size)."""
    rotate_deg: float = 10.0
    flip_p: float = 0.5
    brightness: float = 0.1
    """Additive brightness offset drawn from ±brightness."""
    contrast: float = 0.2
    """Contrast factor drawn from 1 ± contrast, about the image mean."""


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on ``(seed, step, stream)``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def crop_rotate_flip_matrices(n: int, size: tuple[int, int], aug: CXRAugment, generator: torch.Generator) -> Tensor:
    """``float32 (n, 3, 3)`` input-pixel -> output-pixel transforms: flip, zoom into a crop of
    ``crop_scale`` of the area at a random position inside the image, rotate."""
    height, width = size
    eye = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    centre, flip, zoom, rotate, shift = (eye.clone() for _ in range(5))
    centre[:, 0, 2], centre[:, 1, 2] = -width / 2, -height / 2
    flip[:, 0, 0] = torch.where(torch.rand(n, generator=generator) < aug.flip_p, -1.0, 1.0).double()
    area = _uniform(n, aug.crop_scale[0], aug.crop_scale[1], generator)
    factor = 1.0 / area.sqrt()  # >= 1: the crop side is sqrt(area) of the image side
    zoom[:, 0, 0], zoom[:, 1, 1] = factor, factor
    # the crop centre may move as far as keeps every sampled pixel centre inside the image
    offset_x = _uniform(n, -1, 1, generator) * (width - 1) / 2 * (factor - 1)
    offset_y = _uniform(n, -1, 1, generator) * (height - 1) / 2 * (factor - 1)
    angle = torch.deg2rad(_uniform(n, -aug.rotate_deg, aug.rotate_deg, generator))
    rotate[:, 0, 0], rotate[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
    rotate[:, 1, 0], rotate[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    shift[:, 0, 2] = width / 2 + offset_x
    shift[:, 1, 2] = height / 2 + offset_y
    return compose(centre, flip, zoom, rotate, shift).float()


def augment(images: Tensor, aug: CXRAugment, generator: torch.Generator) -> Tensor:
    """One random view of ``images (B, C, H, W)`` in [0, 1]; same shape, values in [0, 1]."""
    n = images.shape[0]
    size = (int(images.shape[-2]), int(images.shape[-1]))
    matrices = crop_rotate_flip_matrices(n, size, aug, generator).to(images.device)
    out = warp_images(images, matrices)
    shape = (n, 1, 1, 1)
    contrast = _uniform(n, 1 - aug.contrast, 1 + aug.contrast, generator).view(shape).to(images)
    brightness = _uniform(n, -aug.brightness, aug.brightness, generator).view(shape).to(images)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + brightness).clamp(0.0, 1.0)


def two_views(images: Tensor, aug: CXRAugment, seed: int, step: int, rank: int = 0) -> tuple[Tensor, Tensor]:
    """Two independent views of the batch, drawn from streams 1 and 2 of ``(seed, step)`` on rank 0
    and from streams of their own on every other DDP rank (so the ranks' images of one step are not
    cropped, rotated and flipped alike)."""
    first = 1 + 1000 * rank
    return (augment(images, aug, step_generator(seed, step, first)),
            augment(images, aug, step_generator(seed, step, first + 1)))
