"""Procedural thorax: a patient's body, its pose in the image, and the attenuation it casts.

Everything is defined in *canonical* coordinates: ``x`` runs from the image's left edge (-1) to
its right edge (+1), ``y`` from the top (-1) to the bottom (+1). The patient faces the viewer
(radiological convention), so the patient's **right** lung lies on the image **left** (x < 0).
Per lung we also use ``d = side_sign * x``, the distance from the midline towards that lung's
chest wall. A `Pose` maps the pixel grid onto canonical coordinates (rotation, scale, shift), so
the same patient can be imaged twice slightly differently.

Attenuation maps are ``float32 (H, W)`` line integrals: larger means more tissue in the beam
and a brighter pixel after display (lungs dark, bone and heart bright). All shapes have compact
support so lesions added to them change the image only inside their boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDES = ("right", "left")  # the patient's sides
SIDE_SIGN = {"right": -1.0, "left": 1.0}  # canonical x sign of each lung
LUNG_SQUARENESS = 2.4  # superellipse exponent of the lung outline (2 = ellipse)


@dataclass(frozen=True)
class Anatomy:
    """One patient's body shape, in canonical units (the image is 2 units wide)."""

    body_half_width: float  # lateral skin line
    body_thickness: float  # soft-tissue attenuation at the midline
    lung_air: float  # how much the lungs lower attenuation (depth of the dark)
    lung_top: float  # y of the apices
    lung_center_d: float  # lateral position of each lung's centre
    lung_rx: float  # half-width of a lung at mid-height
    lung_flare: float  # relative widening of the lungs towards the base
    mediastinum_d: float  # half-width of the mediastinum at the apices
    dome_right: float  # y of the top of the right hemidiaphragm
    dome_left: float  # y of the top of the left hemidiaphragm (usually lower)
    dome_curv: float  # how far the diaphragm drops from dome to costophrenic angle
    heart_x: float
    heart_y: float
    heart_rx: float
    heart_ry: float
    heart_angle: float  # radians; the long axis points down to the patient's left
    heart_density: float
    rib_start: float  # y of the first posterior rib at the spine
    rib_spacing: float
    rib_curv: float
    rib_density: float
    spine_width: float
    clavicle_y: float
    marking_seed: int  # lung vessel pattern


@dataclass(frozen=True)
class Pose:
    """How the patient sits in the image: rotation (radians), scale and shift (canonical units)."""

    angle: float = 0.0
    scale: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """A random adult thorax; the ranges keep every structure inside the image."""
    u = rng.uniform
    dome_right = u(0.26, 0.36)
    return Anatomy(
        body_half_width=u(0.82, 0.88), body_thickness=u(0.9, 1.1), lung_air=u(0.62, 0.74),
        lung_top=u(-0.74, -0.66), lung_center_d=u(0.41, 0.45), lung_rx=u(0.31, 0.35),
        lung_flare=u(0.06, 0.14), mediastinum_d=u(0.05, 0.08),
        dome_right=dome_right, dome_left=dome_right + u(0.02, 0.07), dome_curv=u(0.16, 0.24),
        heart_x=u(0.08, 0.12), heart_y=u(0.12, 0.18), heart_rx=u(0.27, 0.31), heart_ry=u(0.2, 0.24),
        heart_angle=u(-0.5, -0.3), heart_density=u(0.12, 0.2),
        rib_start=u(-0.8, -0.74), rib_spacing=u(0.12, 0.14), rib_curv=u(0.7, 0.95),
        rib_density=u(0.07, 0.11), spine_width=u(0.055, 0.07), clavicle_y=u(-0.64, -0.58),
        marking_seed=int(rng.integers(2**31)),
    )


def sample_pose(rng: np.random.Generator) -> Pose:
    """Slight rotation, magnification and off-centring, as in real positioning."""
    return Pose(angle=float(rng.normal(0.0, 0.03)), scale=float(rng.uniform(0.93, 1.04)),
                shift_x=float(rng.uniform(-0.04, 0.04)), shift_y=float(rng.uniform(-0.03, 0.04)))


# ---- geometry helpers -------------------------------------------------------------------------

def smoothstep(t: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, C1-smooth in between."""
    t = np.minimum(np.maximum(t, 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def bump(t: np.ndarray) -> np.ndarray:
    """Compactly supported bump: 1 at t=0, 0 for |t| >= 1."""
    return smoothstep(1.0 - np.abs(t))


@dataclass(frozen=True)
class LungField:
    """Distance fields of one lung over the image grid (canonical units, positive inside)."""

    d: np.ndarray  # distance from the midline towards this lung's wall
    inside: np.ndarray  # distance to the nearest lung border (<= 0 outside the lung)
    wall: np.ndarray  # distance to the chest-wall/apex border only (ignores mediastinum, diaphragm)
    profile: np.ndarray  # lung thickness in [0, 1]: 0 outside, 1 deep inside


@dataclass(frozen=True)
class Frame:
    """The image grid expressed in canonical coordinates, with the patient's lung fields."""

    anatomy: Anatomy
    pose: Pose
    height: int
    width: int
    x: np.ndarray  # (H, W) canonical x of each pixel centre
    y: np.ndarray  # (H, W) canonical y
    pixel: float  # canonical units per pixel
    lungs: dict[str, LungField]

    def window(self, cx: float, cy: float, radius: float) -> tuple[slice, slice]:
        """Pixel rows and columns covering the canonical disc of ``radius`` around ``(cx, cy)``."""
        p = self.pose
        c, s = np.cos(p.angle), np.sin(p.angle)
        half = max(self.height, self.width) / 2.0
        col = (p.scale * (c * cx - s * cy) + p.shift_x) * half + self.width / 2.0 - 0.5
        row = (p.scale * (s * cx + c * cy) + p.shift_y) * half + self.height / 2.0 - 0.5
        r = radius * p.scale * half + 2.0
        rows = slice(int(np.clip(np.floor(row - r), 0, self.height)), int(np.clip(np.ceil(row + r) + 1, 0, self.height)))
        cols = slice(int(np.clip(np.floor(col - r), 0, self.width)), int(np.clip(np.ceil(col + r) + 1, 0, self.width)))
        return rows, cols


def make_frame(anatomy: Anatomy, pose: Pose, size: int | tuple[int, int]) -> Frame:
    """Map the pixel grid of a ``size`` image (int or (H, W)) onto canonical coordinates."""
    h, w = (size, size) if isinstance(size, int) else size
    scale = max(h, w) / 2.0
    gx = (np.arange(w, dtype=np.float32) + 0.5 - w / 2.0) / scale
    gy = (np.arange(h, dtype=np.float32) + 0.5 - h / 2.0) / scale
    px, py = np.meshgrid(gx - pose.shift_x, gy - pose.shift_y)
    c, s = np.cos(pose.angle), np.sin(pose.angle)
    x = ((c * px + s * py) / pose.scale).astype(np.float32)
    y = ((-s * px + c * py) / pose.scale).astype(np.float32)
    lungs = {side: _lung_field(anatomy, side, x, y) for side in SIDES}
    return Frame(anatomy, pose, h, w, x, y, 1.0 / (scale * pose.scale), lungs)


def dome_y(anatomy: Anatomy, side: str, d: np.ndarray | float) -> np.ndarray | float:
    """y of the hemidiaphragm at lateral distance ``d``: a dome, lowest at the costophrenic angle."""
    top = anatomy.dome_right if side == "right" else anatomy.dome_left
    peak_d = anatomy.lung_center_d - 0.04
    return top + anatomy.dome_curv * ((d - peak_d) / 0.4) ** 2


def lung_ellipse(anatomy: Anatomy, side: str) -> tuple[float, float, float]:
    """Centre y, half-width and half-height of the ellipse that forms a lung's apex and wall."""
    bottom = float(dome_y(anatomy, side, anatomy.lung_center_d)) + 0.45
    yc = (anatomy.lung_top + bottom) / 2.0
    return yc, anatomy.lung_rx, (bottom - anatomy.lung_top) / 2.0


def mediastinum_d(anatomy: Anatomy, y: np.ndarray | float) -> np.ndarray | float:
    """Medial border of the lungs: widens slightly towards the base."""
    return anatomy.mediastinum_d + 0.05 * np.clip((y - anatomy.lung_top) / 1.0, 0.0, 1.0)


def _lung_field(anatomy: Anatomy, side: str, x: np.ndarray, y: np.ndarray) -> LungField:
    d = SIDE_SIGN[side] * x
    yc, rx, ry = lung_ellipse(anatomy, side)
    dy = y - yc
    rx_y = rx * (1.0 + anatomy.lung_flare * np.clip(dy / ry, -1.0, 1.0))
    dx = d - anatomy.lung_center_d
    p = LUNG_SQUARENESS
    ax, ay = np.abs(dx / rx_y) + 1e-6, np.abs(dy / ry) + 1e-6
    axp, ayp = ax**p, ay**p
    total = axp + ayp
    q = total ** (1.0 / p)
    # |grad q| of the superellipse, for a first-order distance to its border
    grad = q / total * np.sqrt((axp / ax / rx_y) ** 2 + (ayp / ay / ry) ** 2)
    wall = (1.0 - q) / grad
    medial = d - mediastinum_d(anatomy, y)
    base = dome_y(anatomy, side, d) - y
    inside = np.minimum(np.minimum(wall, medial), base)
    profile = np.sqrt(np.clip(inside / 0.12, 0.0, 1.0))
    return LungField(d.astype(np.float32), inside.astype(np.float32), wall.astype(np.float32),
                     profile.astype(np.float32))


def lung_point(anatomy: Anatomy, side: str, u: float, v: float) -> tuple[float, float]:
    """Canonical (x, y) of a point inside a lung: ``u`` 0 medial..1 lateral, ``v`` 0 apex..1 base."""
    yc, rx, ry = lung_ellipse(anatomy, side)
    base = float(dome_y(anatomy, side, anatomy.lung_center_d))
    y = anatomy.lung_top + 0.04 + v * (base - anatomy.lung_top - 0.08)
    t = np.clip((y - yc) / ry, -1.0, 1.0)
    p = LUNG_SQUARENESS
    half = rx * (1.0 + anatomy.lung_flare * t) * max(1.0 - abs(t) ** p, 0.0) ** (1.0 / p)
    lateral = anatomy.lung_center_d + half
    medial = max(float(mediastinum_d(anatomy, y)), anatomy.lung_center_d - half)
    d = medial + u * (lateral - medial)
    return SIDE_SIGN[side] * d, float(y)


# ---- attenuation layers -----------------------------------------------------------------------

def body_layer(frame: Frame) -> np.ndarray:
    """Soft tissue of neck, shoulders, arms, chest wall and abdomen, with the humeral heads."""
    a = frame.anatomy
    x, y = frame.x, frame.y
    neck = 0.22
    shoulder = smoothstep((y + 1.0) / 0.3)
    half = neck + (a.body_half_width + 0.04 - neck) * shoulder - 0.04 * smoothstep((y + 0.5) / 0.7)
    trunk = a.body_thickness * np.sqrt(np.clip(1.0 - (x / half) ** 2, 0.0, 1.0))
    # arms hang beside the chest from the shoulders down
    arm_x = np.abs(x) - (a.body_half_width + 0.1)
    arm = 0.5 * a.body_thickness * np.sqrt(np.clip(1.0 - (arm_x / 0.12) ** 2, 0.0, 1.0))
    arm = arm * smoothstep((y + 0.82) / 0.12)
    head_r = np.sqrt((np.abs(x) - a.body_half_width - 0.1) ** 2 + ((y + 0.72) / 1.1) ** 2)
    humerus = 0.3 * np.sqrt(np.clip(1.0 - (head_r / 0.11) ** 2, 0.0, 1.0))
    return (np.maximum(trunk, arm) + humerus).astype(np.float32)


def lung_layer(frame: Frame) -> np.ndarray:
    """Air in both lungs (to subtract from the body): deepest in the middle of each lung."""
    a = frame.anatomy
    return (a.lung_air * (frame.lungs["right"].profile + frame.lungs["left"].profile)).astype(np.float32)


def _vessels(seed: int, side: int, phi: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Vessel pattern at polar coordinates (``phi``, ``r``) around a hilum: wavy radial lines."""
    rng = np.random.default_rng((seed, side))
    logr = np.log(r + 0.05)
    field = np.zeros_like(r)
    for _ in range(12):
        n, m = rng.uniform(5.0, 26.0), rng.uniform(-3.0, 3.0)
        field += np.cos(n * phi + m * logr + rng.uniform(0, 2 * np.pi))
    width = 0.35 + 0.9 * np.exp(-r / 0.25)  # vessels thin out towards the periphery
    lines = np.exp(-(field / width) ** 2) * np.exp(-r / 0.45) * smoothstep(r / 0.08)
    return lines + 0.6 * np.exp(-(r / 0.09) ** 2)


def marking_layer(frame: Frame) -> np.ndarray:
    """Lung vessel markings: wavy lines radiating from each hilum, fading to the periphery."""
    a = frame.anatomy
    out = np.zeros_like(frame.x)
    for k, side in enumerate(SIDES):
        lung = frame.lungs[side]
        inside = lung.inside > 0
        rx = lung.d[inside] - 0.17
        ry = frame.y[inside] - (a.lung_top + 0.62)
        r = np.sqrt(rx**2 + ry**2) + 1e-3
        vessels = _vessels(a.marking_seed, k, np.arctan2(ry, rx), r)
        out[inside] += vessels * np.clip(lung.inside[inside] / 0.03, 0.0, 1.0)
    return (0.1 * out).astype(np.float32)


def bone_layer(frame: Frame) -> np.ndarray:
    """Spine, posterior and anterior ribs, clavicles."""
    a = frame.anatomy
    x, y = frame.x, frame.y
    out = np.zeros_like(x)
    # spine: a column with vertebral bodies, brightest between the lungs
    col = np.sqrt(np.clip(1.0 - (x / a.spine_width) ** 2, 0.0, 1.0))
    vertebrae = 0.8 + 0.2 * np.cos(2 * np.pi * (y - a.rib_start) / (a.rib_spacing * 0.8))
    out += 0.25 * col * vertebrae * smoothstep((y + 1.05) / 0.2)
    for side in SIDES:
        lung = frame.lungs[side]
        d = lung.d
        cage = smoothstep((lung.wall + 0.07) / 0.03) * smoothstep((d - 0.03) / 0.03)
        below = smoothstep((dome_y(a, side, d) + 0.15 - y) / 0.2)  # ribs fade into the abdomen
        # posterior ribs: arcs rising from the spine then sweeping down laterally
        arc = y - a.rib_curv * (d - 0.1) ** 2
        n = (arc - a.rib_start) / a.rib_spacing
        frac = n - np.floor(n)
        band = bump((frac - 0.22) / 0.22) ** 0.5 * (1.0 + 0.5 * bump((frac - 0.02) / 0.05)
                                                       + 0.5 * bump((frac - 0.42) / 0.05))
        count = smoothstep(n + 0.5) * smoothstep(10.0 - n)
        out += a.rib_density * band * count * cage * (0.4 + 0.6 * below)
        # anterior ribs: fainter bands running down towards the sternum
        arc2 = y + 0.55 * (d - 0.2) - 0.35 * (d - 0.6) ** 2
        n2 = (arc2 - a.rib_start + 0.05) / (a.rib_spacing * 1.2)
        frac2 = n2 - np.floor(n2)
        band2 = bump((frac2 - 0.2) / 0.2)
        ant = smoothstep((d - 0.22) / 0.1) * smoothstep(n2 + 0.5) * smoothstep(6.0 - n2)
        out += 0.4 * a.rib_density * band2 * ant * cage * below
        # clavicle: from the sternum up and out to the shoulder
        cy = a.clavicle_y - 0.16 * (d - 0.06) + 0.12 * (d - 0.35) ** 2
        clav = bump((y - cy) / 0.035) ** 0.6 * smoothstep((d - 0.04) / 0.04) * smoothstep((0.75 - d) / 0.08)
        out += 0.2 * clav
    return out.astype(np.float32)


def _heart_radius(frame: Frame, scale: float) -> np.ndarray:
    """Normalised elliptic radius of the cardiac ellipse (< 1 inside), enlarged by ``scale``.

    The upper right heart border stays put; an enlarged heart grows to the left and down.
    """
    a = frame.anatomy
    c, s = np.cos(a.heart_angle), np.sin(a.heart_angle)
    ax, ay = a.heart_x - 0.45 * a.heart_rx, a.heart_y - 0.55 * a.heart_ry
    cx, cy = ax + (a.heart_x - ax) * scale, ay + (a.heart_y - ay) * scale
    dx, dy = frame.x - cx, frame.y - cy
    u = (c * dx + s * dy) / (a.heart_rx * scale)
    v = (-s * dx + c * dy) / (a.heart_ry * scale)
    return u**2 + v**2


def heart_layer(frame: Frame, scale: float = 1.0) -> np.ndarray:
    """The cardiac silhouette: a tilted ellipsoid that displaces the lung behind it.

    Includes the aortic knob above the heart's left border (which does not scale).
    """
    a = frame.anatomy
    q = np.clip(1.0 - _heart_radius(frame, scale), 0.0, 1.0)
    displaced = 0.75 * smoothstep(q / 0.3) * lung_layer(frame)
    heart = a.heart_density * np.sqrt(q) + displaced
    kx, ky = a.heart_x + 0.1, a.heart_y - a.heart_ry - 0.16
    knob = np.clip(1.0 - ((frame.x - kx) / 0.08) ** 2 - ((frame.y - ky) / 0.07) ** 2, 0.0, 1.0)
    return (heart + 0.5 * a.heart_density * np.sqrt(knob)).astype(np.float32)


def heart_support(frame: Frame, scale: float = 1.0) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the cardiac ellipse (without the aortic knob)."""
    return _heart_radius(frame, scale) < 1.0


def stomach_layer(frame: Frame) -> np.ndarray:
    """Gastric air bubble under the left hemidiaphragm (to subtract)."""
    a = frame.anatomy
    d = frame.lungs["left"].d
    top = float(dome_y(a, "left", 0.36))
    q = 1.0 - ((d - 0.36) / 0.11) ** 2 - ((frame.y - top - 0.1) / 0.06) ** 2
    return (0.25 * np.sqrt(np.clip(q, 0.0, 1.0))).astype(np.float32)


def anatomy_attenuation(frame: Frame, clear_markings: np.ndarray | None = None) -> np.ndarray:
    """The normal chest's attenuation ``(H, W)``; ``clear_markings`` in [0, 1] erases vessels."""
    markings = marking_layer(frame)
    if clear_markings is not None:
        markings = markings * (1.0 - clear_markings)
    body = body_layer(frame)
    inner = np.clip(body / max(frame.anatomy.body_thickness, 1e-6) * 3.0, 0.0, 1.0)  # no bone outside the skin
    total = (body - lung_layer(frame) + markings + heart_layer(frame)
             + bone_layer(frame) * inner - stomach_layer(frame))
    return np.maximum(total, 0.0).astype(np.float32)
