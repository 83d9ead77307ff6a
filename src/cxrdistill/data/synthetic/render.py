"""Compose a synthetic radiograph: anatomy + lesions, then exposure, display curve and noise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cxrdistill.data.synthetic.anatomy import (
    Anatomy,
    anatomy_attenuation,
    make_frame,
    sample_anatomy,
    sample_pose,
)
from cxrdistill.data.synthetic.lesions import Lesion, lesion_effect


@dataclass(frozen=True)
class Exposure:
    """Per-image acquisition: beam hardness ``k``, display gamma/window, heel effect, noise level."""

    k: float
    gamma: float
    low: float
    high: float
    heel: float
    noise: float


def sample_exposure(rng: np.random.Generator) -> Exposure:
    return Exposure(k=float(rng.uniform(1.0, 1.5)), gamma=float(rng.uniform(0.8, 1.25)),
                    low=float(rng.uniform(0.0, 0.08)), high=float(rng.uniform(0.86, 1.0)),
                    heel=float(rng.uniform(-0.08, 0.08)), noise=float(rng.uniform(0.012, 0.035)))


def render_image(rng: np.random.Generator, size: int | tuple[int, int], lesions: Sequence[Lesion],
                 *, anatomy: Anatomy | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render one radiograph with ``lesions``.

    Returns the image ``float32 (H, W)`` in [0, 1] and the lesions' boxes ``float32 (N, 4)``
    xyxy in pixels (one row per lesion, same order), each the tight bounding box of the pixels
    the lesion changes. The random draws (anatomy unless given, pose, exposure, noise) do not
    depend on ``lesions``: the same generator state renders the same chest with or without them.
    """
    anatomy = sample_anatomy(rng) if anatomy is None else anatomy
    pose = sample_pose(rng)
    exposure = sample_exposure(rng)
    frame = make_frame(anatomy, pose, size)
    noise = rng.standard_normal((frame.height, frame.width)).astype(np.float32)
    effects = [lesion_effect(frame, lesion) for lesion in lesions]
    kept = np.ones_like(frame.x)
    extra = np.zeros_like(frame.x)
    boxes = np.zeros((len(effects), 4), dtype=np.float32)
    for i, (lesion, effect) in enumerate(zip(lesions, effects)):
        extra += effect.attenuation
        support = effect.support | (effect.attenuation != 0)
        if effect.clear_markings is not None:
            kept *= 1.0 - effect.clear_markings
            support |= effect.clear_markings > 0
        if not support.any():
            raise ValueError(f"lesion {i} ({lesion.kind}) is not visible in a {size} image")
        boxes[i] = _bounding_box(support)
    clear = None if not effects else 1.0 - kept
    attenuation = np.maximum(anatomy_attenuation(frame, clear) + extra, 0.0)
    return _display(attenuation, exposure, noise), boxes


def _display(attenuation: np.ndarray, exposure: Exposure, noise: np.ndarray) -> np.ndarray:
    """Pixelwise: exponential detector response, window, gamma, heel effect, quantum noise."""
    ex = exposure
    signal = (1.0 - np.exp(-ex.k * attenuation)) / (1.0 - np.exp(-ex.k * 2.0))
    signal = np.clip(signal, 0.0, 1.0) ** ex.gamma
    image = ex.low + (ex.high - ex.low) * signal
    h = image.shape[0]
    image = image * (1.0 + ex.heel * np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None])
    image = image + ex.noise * (0.5 + 0.7 * np.sqrt(image)) * noise
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _bounding_box(support: np.ndarray) -> np.ndarray:
    """Tight xyxy box (pixel edges) around the True pixels of ``support``."""
    rows = np.flatnonzero(support.any(axis=1))
    cols = np.flatnonzero(support.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)
