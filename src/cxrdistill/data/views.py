"""Weak/strong augmented views that record their geometry as 3x3 matrices.

Coordinates are continuous pixel coordinates: pixel ``(row i, col j)`` covers ``[j, j+1] x [i, i+1]``
(its centre is ``(j + 0.5, i + 0.5)``), the convention of ``xyxy`` boxes. A matrix ``M`` maps a
homogeneous input point ``(x, y, 1)`` to the output point ``M @ (x, y, 1)`` divided by its last
coordinate, so affine and projective (perspective) transforms share one code path.

:func:`random_view` is the one augmentation every recipe uses (a :class:`View`: images, matrices,
projected boxes). A teacher's boxes on the weak view reach the student's strong view with
``project_boxes(boxes, weak.into(strong)[i], image_size)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ViewConfig:
    """Random geometry and intensity of one view.

    flip_p: probability of a horizontal flip. rotate_deg: maximum absolute rotation. translate:
    maximum shift as a fraction of width/height. scale: (low, high) zoom range. perspective: maximum
    corner displacement as a fraction of half the image size (torchvision's distortion_scale).
    intensity: strength in [0, 1] of :func:`intensity_jitter` (0: none). contrast / brightness: the
    ranges of :func:`linear_jitter` (AALS's "intensity and contrast jittering"; 0 and 0: none).
    """

    flip_p: float = 0.0
    rotate_deg: float = 0.0
    translate: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    perspective: float = 0.0
    intensity: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0

    @classmethod
    def weak(cls) -> ViewConfig:
        """Flip only: the teacher's view."""
        return cls(flip_p=0.5)

    @classmethod
    def martins_silva(cls) -> ViewConfig:
        """The strong list of Martins & Silva: flip 0.5, rotate 25°, shift 15 %, scale 0.9-1.1,
        perspective 0.2; plus intensity jitter."""
        return cls(flip_p=0.5, rotate_deg=25.0, translate=0.15, scale=(0.9, 1.1),
                   perspective=0.2, intensity=0.5)


# ---------------------------------------------------------------------------------------------
# matrices


def _normalise(matrix: Tensor) -> Tensor:
    """Homographies are defined up to scale: the canonical one has bottom-right entry 1."""
    return matrix / matrix[..., 2:3, 2:3]


def compose(*matrices: Tensor) -> Tensor:
    """The transform that applies ``matrices[0]`` first, then ``matrices[1]``, ...: ``(..., 3, 3)``."""
    result = matrices[0]
    for matrix in matrices[1:]:
        result = matrix @ result
    return _normalise(result)


def invert(matrix: Tensor) -> Tensor:
    """Inverse transform(s) ``(..., 3, 3)`` (bottom-right entry 1)."""
    return _normalise(torch.linalg.inv(matrix))


def _eye(batch: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.eye(3, dtype=dtype).repeat(batch, 1, 1)


def _uniform(batch: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)


def random_affine(
    batch_size: int,
    *,
    image_size: tuple[int, int],
    flip_p: float = 0.0,
    rotate_deg: float = 0.0,
    translate: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    perspective: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random transforms ``float32 (B, 3, 3)`` from input pixel coords to output pixel coords.

    Applied about the image centre in the order flip, scale, rotate, translate, then (when
    ``perspective > 0``) a random homography that moves each corner inward by up to
    ``perspective * half size`` (so the matrix is projective, not affine).
    """
    height, width = image_size
    centre = _eye(batch_size)
    centre[:, 0, 2], centre[:, 1, 2] = -width / 2, -height / 2
    flip = _eye(batch_size)
    flip[:, 0, 0] = torch.where(torch.rand(batch_size, generator=generator) < flip_p, -1.0, 1.0)
    zoom = _eye(batch_size)
    factor = _uniform(batch_size, scale[0], scale[1], generator)
    zoom[:, 0, 0], zoom[:, 1, 1] = factor, factor
    angle = torch.deg2rad(_uniform(batch_size, -rotate_deg, rotate_deg, generator))
    rotate = _eye(batch_size)
    rotate[:, 0, 0], rotate[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
    rotate[:, 1, 0], rotate[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    shift = _eye(batch_size)
    shift[:, 0, 2] = width / 2 + width * _uniform(batch_size, -translate, translate, generator)
    shift[:, 1, 2] = height / 2 + height * _uniform(batch_size, -translate, translate, generator)
    matrix = compose(centre, flip, zoom, rotate, shift)
    if perspective > 0:
        matrix = compose(matrix, _random_perspective(batch_size, image_size, perspective, generator))
    return matrix.float()


def _random_perspective(batch: int, image_size: tuple[int, int], distortion: float,
                        generator: torch.Generator | None) -> Tensor:
    """Homographies ``(B, 3, 3)`` mapping the image corners to randomly inset corners."""
    height, width = image_size
    corners = torch.tensor([[0, 0], [width, 0], [width, height], [0, height]], dtype=torch.float64)
    inward = torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=torch.float64)
    half = torch.tensor([width / 2, height / 2], dtype=torch.float64)
    amount = torch.rand(batch, 4, 2, generator=generator, dtype=torch.float64)
    moved = corners + inward * half * distortion * amount
    return homography_from_points(corners.expand(batch, 4, 2), moved)


def homography_from_points(source: Tensor, target: Tensor) -> Tensor:
    """The homographies ``(B, 3, 3)`` taking 4 points ``source (B, 4, 2)`` to ``target (B, 4, 2)``."""
    x, y = source[..., 0], source[..., 1]
    u, v = target[..., 0], target[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    system = torch.cat([rows_u, rows_v], dim=1)  # (B, 8, 8)
    params = torch.linalg.solve(system, torch.cat([u, v], dim=1))
    return torch.cat([params, torch.ones_like(params[:, :1])], dim=1).reshape(-1, 3, 3)


# ---------------------------------------------------------------------------------------------
# images and boxes


def warp_images(images: Tensor, matrices: Tensor) -> Tensor:
    """Warp ``images (B, C, H, W)`` by ``matrices (B, 3, 3)``; outside the source is 0.

    Each output pixel centre is mapped back through the inverse homography and sampled
    bilinearly (``grid_sample``), which covers affine and perspective alike, on any device.
    """
    batch, _, height, width = images.shape
    # invert in float64 on the CPU (some accelerators lack float64), sample in float32
    inverse = invert(matrices.detach().cpu().double()).to(images.device, torch.float32)
    ys = torch.arange(height, device=images.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=images.device, dtype=torch.float32) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1).reshape(-1, 3)
    source = points @ inverse.transpose(1, 2)  # (B, H*W, 3)
    source = source[..., :2] / source[..., 2:3]
    normalised = torch.stack([2 * source[..., 0] / width - 1, 2 * source[..., 1] / height - 1], -1)
    grid = normalised.reshape(batch, height, width, 2).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def transform_points(points: Tensor, matrix: Tensor) -> Tensor:
    """Apply ``matrix (3, 3)`` to ``points (N, 2)``; returns ``(N, 2)``."""
    homogeneous = torch.cat([points, torch.ones_like(points[:, :1])], dim=1)
    mapped = homogeneous @ matrix.to(points).T
    return mapped[:, :2] / mapped[:, 2:3]


def project_boxes(
    boxes: Tensor,
    matrix: Tensor,
    image_size: tuple[int, int],
    min_visible: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Project ``xyxy`` boxes ``(N, 4)`` through ``matrix (3, 3)`` into an image of ``(H, W)``.

    The box is the min/max of its 4 transformed corners, clipped to the image. Boxes that keep
    less than ``min_visible`` of their projected area inside the image are dropped. Returns
    ``(kept boxes (K, 4), keep mask (N,) bool)``; filter labels and scores with the same mask.
    """
    height, width = image_size
    if boxes.numel() == 0:
        return boxes.reshape(0, 4), torch.zeros(0, dtype=torch.bool, device=boxes.device)
    x0, y0, x1, y1 = boxes.unbind(-1)
    corners = torch.stack([x0, y0, x1, y0, x1, y1, x0, y1], dim=-1).reshape(-1, 2)
    mapped = transform_points(corners.float(), matrix.float()).reshape(-1, 4, 2)
    projected = torch.cat([mapped.amin(dim=1), mapped.amax(dim=1)], dim=-1)
    limits = torch.tensor([width, height, width, height], dtype=projected.dtype,
                          device=projected.device)
    clipped = torch.minimum(projected.clamp(min=0), limits)
    full_area = _area(projected)
    keep = (_area(clipped) >= min_visible * full_area) & (full_area > 0)
    keep &= torch.isfinite(projected).all(dim=-1)
    return clipped[keep].to(boxes.dtype), keep


def _area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


# ---------------------------------------------------------------------------------------------
# intensity


def intensity_jitter(images: Tensor, strength: float,
                     generator: torch.Generator | None = None) -> Tensor:
    """Random brightness, contrast, gamma, Gaussian noise and blur per image; result in [0, 1].

    ``images (B, C, H, W)`` in [0, 1]; ``strength`` in [0, 1] scales every range (0 returns the
    input): brightness ±0.2, contrast ×(1 ± 0.4), gamma exp(±0.5), noise σ ≤ 0.04, blur σ ≤ 1.5 px.
    """
    if strength <= 0:
        return images
    batch = images.shape[0]
    device, dtype = images.device, images.dtype

    def draw(low: float, high: float) -> Tensor:
        return _uniform(batch, low, high, generator).to(device, dtype).view(batch, 1, 1, 1)

    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * draw(1 - 0.4 * strength, 1 + 0.4 * strength) + mean
    out = out + draw(-0.2 * strength, 0.2 * strength)
    out = out.clamp(0, 1) ** torch.exp(draw(-0.5 * strength, 0.5 * strength))
    out = _gaussian_blur(out, draw(0, 1.5 * strength).flatten())
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float64)
    out = out + noise.to(device, dtype) * draw(0, 0.04 * strength)
    return out.clamp(0, 1)


def linear_jitter(images: Tensor, contrast: float, brightness: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """Contrast about each image's mean by a factor from ``1 ± contrast``, then a brightness shift
    from ``± brightness``; ``images (B, C, H, W)`` in [0, 1], result clipped to [0, 1]."""
    shape = (len(images), 1, 1, 1)
    gain = 1 + contrast * (2 * torch.rand(shape, generator=generator) - 1)
    shift = brightness * (2 * torch.rand(shape, generator=generator) - 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * gain.to(images) + mean + shift.to(images)).clamp(0, 1)


def _gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """Separable Gaussian blur with one ``sigma`` per image (0: unchanged), reflect padding."""
    batch, channels, height, width = images.shape
    radius = max(1, math.ceil(3 * float(sigmas.max())))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    safe = sigmas.clamp(min=1e-3).view(-1, 1)
    kernels = torch.exp(-0.5 * (offsets / safe) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    kernels = kernels.repeat_interleave(channels, dim=0)  # (B*C, K)
    flat = images.reshape(1, batch * channels, height, width)
    pad = min(radius, height - 1, width - 1)
    kernels = kernels[:, radius - pad: radius + pad + 1]
    flat = F.pad(flat, (pad, pad, 0, 0), mode="reflect")
    flat = F.conv2d(flat, kernels[:, None, None, :], groups=batch * channels)
    flat = F.pad(flat, (0, 0, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernels[:, None, :, None], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


# ---------------------------------------------------------------------------------------------
# the view


@dataclass
class View:
    """One random view of a batch.

    ``images (B, C, H, W)``; ``matrices (B, 3, 3)`` from input pixel coordinates to view pixel
    coordinates; when boxes were given, ``boxes`` (per image ``(K, 4)`` xyxy in the view),
    ``labels`` (per image ``(K,)``) and ``keep`` (per image ``(N,)`` bool: which input boxes survived,
    to filter scores or other per-box entries the same way).
    """

    images: Tensor
    matrices: Tensor
    boxes: list[Tensor] | None = None
    labels: list[Tensor] | None = None
    keep: list[Tensor] | None = None

    @property
    def targets(self) -> list[dict[str, Tensor]]:
        """Detector targets ``[{"boxes": (K, 4), "labels": (K,)}]`` of the projected boxes."""
        if self.boxes is None or self.labels is None:
            raise ValueError("this view was made without boxes")
        return [{"boxes": b, "labels": lab} for b, lab in zip(self.boxes, self.labels, strict=True)]

    def into(self, other: View) -> Tensor:
        """``(B, 3, 3)``: pixel coordinates of this view -> those of ``other`` (e.g. weak -> strong)."""
        return compose(invert(self.matrices), other.matrices)


def random_view(
    images: Tensor,
    cfg: ViewConfig | None,
    generator: torch.Generator | None = None,
    boxes: list[Tensor] | None = None,
    labels: list[Tensor] | None = None,
) -> View:
    """The one augmentation of every recipe: a random view of ``images (B, 1, H, W)`` by ``cfg``.

    Draws, in this order from ``generator``: the geometry (:func:`random_affine`), then the linear
    contrast / brightness jitter (when ``cfg.contrast`` or ``cfg.brightness`` > 0), then the
    intensity jitter (:func:`intensity_jitter`, when ``cfg.intensity`` > 0). ``boxes`` (per image
    ``(N, 4)`` xyxy) and their ``labels`` are projected into the view (:func:`project_boxes`: boxes
    keeping < 50 % of their area are dropped). ``cfg=None``: the images themselves (identity
    matrices, boxes unchanged, nothing drawn). A weak and a strong view of the same images are two
    calls with the same generator; ``weak.into(strong)`` maps one into the other.
    """
    batch = images.shape[0]
    if cfg is None:
        eye = torch.eye(3, device=images.device).expand(batch, 3, 3).clone()
        keep = None if boxes is None else [torch.ones(len(b), dtype=torch.bool, device=b.device) for b in boxes]
        return View(images, eye, None if boxes is None else list(boxes), None if labels is None else list(labels),
                    keep)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    matrices = random_affine(batch, image_size=size, flip_p=cfg.flip_p, rotate_deg=cfg.rotate_deg,
                             translate=cfg.translate, scale=cfg.scale, perspective=cfg.perspective,
                             generator=generator).to(images.device)
    out = warp_images(images, matrices)
    if cfg.contrast > 0 or cfg.brightness > 0:
        out = linear_jitter(out, cfg.contrast, cfg.brightness, generator)
    out = intensity_jitter(out, cfg.intensity, generator)
    if boxes is None:
        return View(out, matrices)
    projected = [project_boxes(b, m, size) for b, m in zip(boxes, matrices, strict=True)]
    kept_labels = None
    if labels is not None:
        kept_labels = [lab[keep.to(lab.device)] for lab, (_, keep) in zip(labels, projected, strict=True)]
    return View(out, matrices, [b for b, _ in projected], kept_labels, [keep for _, keep in projected])


__all__ = [
    "View", "ViewConfig", "compose", "homography_from_points", "intensity_jitter", "invert", "linear_jitter",
    "project_boxes", "random_affine", "random_view", "transform_points", "warp_images",
]
