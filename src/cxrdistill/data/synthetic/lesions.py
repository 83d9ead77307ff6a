"""Lesion classes of the synthetic world: how each one is sampled and how it changes the chest.

A `Lesion` is a small, anatomy-relative description (which lung, where in it, how big, how
dense, a seed for its irregular shape). `lesion_effect` turns it into an `Effect` on a concrete
`Frame`: the attenuation it adds, the lung markings it erases and its exact pixel support, whose
bounding box is the lesion's box. Every effect has compact support, so the rendered image changes
only inside the box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxrdistill.data.synthetic.anatomy import (
    SIDE_SIGN,
    SIDES,
    Frame,
    bump,
    dome_y,
    heart_layer,
    heart_support,
    lung_point,
    mediastinum_d,
    smoothstep,
)

#: Class names of the synthetic world, in category-id order (id = position + 1).
SYNTHETIC_CLASSES: tuple[str, ...] = (
    "nodule", "pleural effusion", "consolidation", "cardiomegaly", "pneumothorax")

MM_PER_UNIT = 175.0  # a canonical unit is half the image width, about 17.5 cm of chest


@dataclass(frozen=True)
class Lesion:
    """One finding, placed relative to the patient's anatomy.

    ``side`` is the patient's side ("right" lies on the image left); ``u`` runs from the
    mediastinum (0) to the chest wall (1) and ``v`` from the apex (0) to the base (1) of that
    lung; ``size`` and ``contrast`` are in [0, 1] and mean what each class makes of them.
    """

    kind: str
    side: str = "right"
    u: float = 0.5
    v: float = 0.5
    size: float = 0.5
    contrast: float = 0.5
    seed: int = 0

    @property
    def zone(self) -> str:
        return "upper" if self.v < 0.36 else ("middle" if self.v < 0.66 else "lower")

    @property
    def severity(self) -> str:
        return "small" if self.size < 0.34 else ("moderate" if self.size < 0.67 else "large")

    @property
    def diameter_mm(self) -> int:
        """Nodule diameter in millimetres (meaningful for nodules only)."""
        return int(round(2.0 * _nodule_radius(self) * MM_PER_UNIT))


@dataclass
class Effect:
    """What a lesion does to a frame: all arrays ``(H, W)``."""

    attenuation: np.ndarray  # float32, added to the chest's attenuation
    support: np.ndarray  # bool, every pixel the lesion changes (its box is the lesion's box)
    clear_markings: np.ndarray | None = None  # float32 in [0, 1], lung markings erased


def sample_lesion(rng: np.random.Generator, kind: str) -> Lesion:
    """A random lesion of class ``kind`` (one of `SYNTHETIC_CLASSES`)."""
    if kind not in SYNTHETIC_CLASSES:
        raise ValueError(f"unknown synthetic lesion class {kind!r}; known: {list(SYNTHETIC_CLASSES)}")
    side = SIDES[int(rng.integers(2))]
    size, contrast = float(rng.uniform()), float(rng.uniform())
    seed = int(rng.integers(2**31))
    if kind == "nodule":
        u, v = float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.12, 0.85))
    elif kind == "consolidation":
        u, v = float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.25, 0.8))
    else:
        u, v = 0.5, (0.9 if kind == "pleural effusion" else 0.1)
    if kind == "cardiomegaly":
        side = ""
    return Lesion(kind, side, u, v, size, contrast, seed)


def lesion_effect(frame: Frame, lesion: Lesion) -> Effect:
    """The change ``lesion`` makes to the chest in ``frame``."""
    render = _RENDERERS.get(lesion.kind)
    if render is None:
        raise ValueError(f"unknown synthetic lesion class {lesion.kind!r}; known: {list(SYNTHETIC_CLASSES)}")
    if lesion.kind != "cardiomegaly" and lesion.side not in SIDES:
        raise ValueError(f"{lesion.kind} needs side 'right' or 'left', got {lesion.side!r}")
    return render(frame, lesion)


# ---- renderers --------------------------------------------------------------------------------

def _nodule_radius(lesion: Lesion) -> float:
    return 0.034 + 0.045 * lesion.size


def _wobble(rng: np.random.Generator, angle: np.ndarray, amount: float) -> np.ndarray:
    """Relative radius ``1 + noise(angle)`` from a few random angular harmonics."""
    out = np.ones_like(angle)
    for k in (2, 3, 5):
        out += amount / k * rng.uniform(-1, 1) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return out


def _paste(frame: Frame, window: tuple[slice, slice], *crops: np.ndarray) -> list[np.ndarray]:
    """Full-frame ``(H, W)`` copies of arrays computed on a window (zeros elsewhere)."""
    out = []
    for crop in crops:
        full = np.zeros((frame.height, frame.width), dtype=crop.dtype)
        full[window] = crop
        out.append(full)
    return out


def _nodule(frame: Frame, lesion: Lesion) -> Effect:
    """A small, round, slightly lobulated bright blob (projected sphere)."""
    rng = np.random.default_rng(lesion.seed)
    cx, cy = lung_point(frame.anatomy, lesion.side, lesion.u, lesion.v)
    radius = max(_nodule_radius(lesion), 1.4 * frame.pixel)
    win = frame.window(cx, cy, radius * 1.5)
    dx, dy = frame.x[win] - cx, frame.y[win] - cy
    q = np.sqrt(dx**2 + dy**2) / (radius * _wobble(rng, np.arctan2(dy, dx), 0.25))
    shape = np.clip(1.0 - q**2, 0.0, 1.0) ** 0.75
    amplitude = 0.1 + 0.15 * lesion.contrast
    (effect,) = _paste(frame, win, (amplitude * shape).astype(np.float32))
    return Effect(effect, effect > 0)


def _effusion(frame: Frame, lesion: Lesion) -> Effect:
    """Fluid layering at the lung base with a meniscus climbing the lateral chest wall."""
    a, lung = frame.anatomy, frame.lungs[lesion.side]
    lateral = a.lung_center_d + a.lung_rx * (1.0 + a.lung_flare)
    angle_y = float(dome_y(a, lesion.side, lateral - 0.02))  # costophrenic angle
    level = angle_y - 0.06 - 0.45 * lesion.size
    medial = mediastinum_d(a, frame.y)
    across = np.clip((lung.d - medial) / (lateral - medial), 0.0, 1.0)
    meniscus = level - (0.1 + 0.18 * lesion.size) * across**2
    fill = smoothstep((frame.y - meniscus) / 0.05) * (0.85 + 0.15 * smoothstep((frame.y - meniscus) / 0.2))
    inside = np.clip(lung.inside / 0.02, 0.0, 1.0)
    density = a.lung_air * lung.profile + (0.05 + 0.1 * lesion.contrast) * inside
    effect = fill * density
    return Effect(effect.astype(np.float32), effect > 0, fill * inside)


def _consolidation(frame: Frame, lesion: Lesion) -> Effect:
    """A patchy airspace opacity (merging acinar blobs) with air bronchograms, inside one lung."""
    rng = np.random.default_rng(lesion.seed)
    a = frame.anatomy
    cx, cy = lung_point(a, lesion.side, lesion.u, lesion.v)
    rx = 0.08 + 0.11 * lesion.size
    ry = rx * rng.uniform(0.75, 1.25)
    win = frame.window(cx, cy, 1.3 * max(rx, ry))
    lung = frame.lungs[lesion.side]
    t = rng.uniform(0, np.pi)
    dx, dy = frame.x[win] - cx, frame.y[win] - cy
    u = (np.cos(t) * dx + np.sin(t) * dy) / rx
    v = (-np.sin(t) * dx + np.cos(t) * dy) / ry
    clear = np.ones_like(u)
    for _ in range(7 + int(8 * lesion.size)):
        rho, ang = 0.75 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        rad = rng.uniform(0.3, 0.5)
        dist = np.sqrt((u - rho * np.cos(ang)) ** 2 + (v - rho * np.sin(ang)) ** 2) / rad
        clear *= 1.0 - rng.uniform(0.5, 1.0) * smoothstep((1.0 - dist) / 0.7)
    patches = 1.0 - clear
    toward_hilum = np.arctan2(a.lung_top + 0.62 - cy, SIDE_SIGN[lesion.side] * 0.17 - cx)
    bronchi = np.ones_like(u)
    for _ in range(2):
        w = toward_hilum + rng.uniform(-0.4, 0.4)
        off = rng.uniform(-0.3, 0.3) * rx
        across = -np.sin(w) * dx + np.cos(w) * dy - off
        bronchi *= 1.0 - 0.45 * bump(across / max(0.012, 0.9 * frame.pixel))
    amplitude = a.lung_air * (0.3 + 0.45 * lesion.contrast)
    effect = amplitude * patches * bronchi * lung.profile[win]
    clear_markings = 0.7 * patches * (lung.inside[win] > 0)
    effect, clear_markings = _paste(frame, win, effect.astype(np.float32), clear_markings.astype(np.float32))
    return Effect(effect, effect > 0, clear_markings)


def _cardiomegaly(frame: Frame, lesion: Lesion) -> Effect:
    """An enlarged cardiac silhouette; the box is the whole (enlarged) heart."""
    scale = 1.2 + 0.25 * lesion.size
    effect = heart_layer(frame, scale) - heart_layer(frame, 1.0)
    return Effect(effect.astype(np.float32), heart_support(frame, scale))


def _pneumothorax(frame: Frame, lesion: Lesion) -> Effect:
    """Air between chest wall and a collapsed lung: dark, no vessels, a thin bright pleural line."""
    a, lung = frame.anatomy, frame.lungs[lesion.side]
    px = frame.pixel
    depth0 = max(0.035 + 0.1 * lesion.size, 2.5 * px)
    bottom = a.lung_top + 0.35 + 0.75 * lesion.size  # how far down the lateral wall it reaches
    reach = np.clip((bottom - frame.y) / (bottom - a.lung_top), 0.0, 1.0)
    depth = depth0 * np.sqrt(reach)
    inside = smoothstep(lung.inside / px)
    region = smoothstep((depth - lung.wall) / (1.5 * px)) * inside
    width = max(0.01, 0.8 * px)
    line = bump((lung.wall - depth) / width) * smoothstep((bottom - frame.y) / 0.06) * inside
    air = 0.08 + 0.1 * lesion.contrast
    edge = 0.07 + 0.08 * lesion.contrast
    effect = edge * line - air * region
    return Effect(effect.astype(np.float32), (region > 0) | (line > 0), region.astype(np.float32))


_RENDERERS = {
    "nodule": _nodule,
    "pleural effusion": _effusion,
    "consolidation": _consolidation,
    "cardiomegaly": _cardiomegaly,
    "pneumothorax": _pneumothorax,
}
