"""Build a whole synthetic dataset on disk: PNG phantoms plus an extended-COCO manifest."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrdistill.data.manifest import write_json_atomic
from cxrdistill.data.synthetic.anatomy import sample_anatomy
from cxrdistill.data.synthetic.lesions import SYNTHETIC_CLASSES, sample_lesion
from cxrdistill.data.synthetic.render import render_image
from cxrdistill.data.synthetic.reports import write_report
from cxrdistill.errors import ConfigError

SPLIT_NAMES = ("train", "val", "test")
MIN_IMAGE_SIZE = 32
EXTRA_LESION_PROBABILITIES = (0.6, 0.3, 0.1)  # an abnormal image has 1, 2 or 3 lesions


def make_world(out_dir: str | Path, *, n_images: int = 200, image_size: int = 128, seed: int = 0,
               report_error_rate: float = 0.1, classes: Sequence[str] | None = None,
               normal_fraction: float = 0.3, splits: Sequence[float] = (0.7, 0.15, 0.15),
               n_patients: int | None = None, bit_depth: int = 16) -> Path:
    """Write ``n_images`` phantom radiographs to ``out_dir/images`` and ``out_dir/manifest.json``.

    Deterministic in ``seed`` (same bytes twice). Every abnormal image holds 1..3 lesions of
    ``classes`` (default `SYNTHETIC_CLASSES`), whose primary classes cycle so that each class
    appears once there are as many abnormal images as classes. About 15% of patients (or
    ``n_images - n_patients``) have two images, always in the same split. Returns the manifest path.
    """
    classes = _check(n_images, image_size, report_error_rate, classes, normal_fraction, splits,
                     n_patients, bit_depth)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    plan = np.random.default_rng((seed, 0))
    kinds = _plan_lesions(plan, n_images, classes, normal_fraction)
    patient_of = _plan_patients(plan, n_images, n_patients)
    split_of = _plan_splits(plan, patient_of, splits)
    anatomies: dict[int, Any] = {}
    images, annotations = [], []
    for i in range(n_images):
        rng = np.random.default_rng((seed, 1, i))
        patient = patient_of[i]
        if patient not in anatomies:
            anatomies[patient] = sample_anatomy(np.random.default_rng((seed, 2, patient)))
        lesions = [sample_lesion(rng, k) for k in kinds[i]]
        pixels, boxes = render_image(rng, image_size, lesions, anatomy=anatomies[patient])
        report, truth = write_report(rng, lesions, classes, report_error_rate)
        file_name = f"images/{i + 1:06d}.png"
        _write_png(out_dir / file_name, pixels, bit_depth)
        images.append({
            "id": i + 1, "file_name": file_name, "width": image_size, "height": image_size,
            "split": split_of[patient], "supervision": "box", "labels": truth["present"],
            "report": report, "patient_id": f"p{patient + 1:05d}", "report_truth": truth})
        for lesion, box in zip(lesions, boxes):
            annotations.append(_annotation(len(annotations) + 1, i + 1, classes.index(lesion.kind) + 1, box))
    manifest = {
        "info": {"generator": "cxrdistill.data.synthetic", "version": 1, "seed": seed,
                 "n_images": n_images, "image_size": image_size,
                 "report_error_rate": report_error_rate, "classes": list(classes),
                 "normal_fraction": normal_fraction, "splits": list(splits),
                 "n_patients": len(set(patient_of)), "bit_depth": bit_depth},
        "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)],
        "images": images, "annotations": annotations}
    path = out_dir / "manifest.json"
    write_json_atomic(path, manifest)  # written last and atomically: its presence means complete
    return path


def _check(n_images: int, image_size: int, error_rate: float, classes: Sequence[str] | None,
           normal_fraction: float, splits: Sequence[float], n_patients: int | None,
           bit_depth: int) -> list[str]:
    """Validate the generator parameters; returns the class list."""
    problems = []
    if n_images < 1:
        problems.append(f"n_images must be >= 1, got {n_images}")
    if image_size < MIN_IMAGE_SIZE:
        problems.append(f"image_size must be >= {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if not 0.0 <= error_rate <= 1.0:
        problems.append(f"report_error_rate must be in [0, 1], got {error_rate}")
    if not 0.0 <= normal_fraction <= 1.0:
        problems.append(f"normal_fraction must be in [0, 1], got {normal_fraction}")
    if len(splits) != 3 or any(f < 0 for f in splits) or not math.isclose(sum(splits), 1.0, abs_tol=1e-6):
        problems.append(f"splits must be three non-negative fractions (train, val, test) summing to 1, got {list(splits)}")
    if n_patients is not None and not 1 <= n_patients <= max(n_images, 1):
        problems.append(f"n_patients must be between 1 and n_images ({n_images}), got {n_patients}")
    if bit_depth not in (8, 16):
        problems.append(f"bit_depth must be 8 or 16, got {bit_depth}")
    chosen = list(SYNTHETIC_CLASSES if classes is None else classes)
    unknown = [c for c in chosen if c not in SYNTHETIC_CLASSES]
    if unknown:
        problems.append(f"unknown class(es) {unknown}; the synthetic world has {list(SYNTHETIC_CLASSES)}")
    if not chosen or len(set(chosen)) != len(chosen):
        problems.append(f"classes must be a non-empty list without repeats, got {chosen}")
    if problems:
        raise ConfigError("make_world: " + "; ".join(problems))
    return chosen


def _plan_lesions(rng: np.random.Generator, n: int, classes: list[str], normal_fraction: float) -> list[list[str]]:
    """Lesion classes per image: exactly ``round(n * normal_fraction)`` images are normal."""
    n_normal = int(round(n * normal_fraction))
    abnormal = np.sort(rng.permutation(n)[: n - n_normal])
    kinds: list[list[str]] = [[] for _ in range(n)]
    order: list[str] = []
    for i in abnormal:
        if not order:
            order = [classes[k] for k in rng.permutation(len(classes))]
        first = order.pop()
        count = 1 + int(rng.choice(len(EXTRA_LESION_PROBABILITIES), p=EXTRA_LESION_PROBABILITIES))
        others = [c for c in classes if c != first]
        extra = [others[k] for k in rng.permutation(len(others))[: count - 1]]
        kinds[i] = [first] + extra
        if "nodule" in kinds[i] and rng.uniform() < 0.2:
            kinds[i].append("nodule")  # sometimes two nodules
    return kinds


def _plan_patients(rng: np.random.Generator, n: int, n_patients: int | None) -> list[int]:
    """Patient index of each image; every patient has >= 1 image, some have two (or more)."""
    p = n_patients if n_patients is not None else max(1, n - int(round(0.15 * n / 2)))
    owners = list(range(p)) + [int(k) for k in rng.integers(p, size=n - p)]
    return [owners[k] for k in rng.permutation(n)]


def _plan_splits(rng: np.random.Generator, patient_of: list[int], fractions: Sequence[float]) -> dict[int, str]:
    """Assign whole patients to splits so the image counts follow ``fractions``."""
    counts: dict[int, int] = {}
    for p in patient_of:
        counts[p] = counts.get(p, 0) + 1
    target = np.asarray(fractions, dtype=float) * len(patient_of)
    have = np.zeros(3)
    out = {}
    for p in [list(counts)[k] for k in rng.permutation(len(counts))]:
        k = int(np.argmax(target - have))
        out[p] = SPLIT_NAMES[k]
        have[k] += counts[p]
    return out


def _annotation(ann_id: int, image_id: int, category_id: int, box: np.ndarray) -> dict[str, Any]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}


def _write_png(path: Path, pixels: np.ndarray, bit_depth: int) -> None:
    top = 65535 if bit_depth == 16 else 255
    data = np.round(np.clip(pixels, 0.0, 1.0) * top).astype(np.uint16 if bit_depth == 16 else np.uint8)
    Image.fromarray(data).save(path, format="PNG", compress_level=1)
