"""Patient-level, seeded, class-stratified splits for semi-supervised studies.

`make_splits` assigns train/val/test to images that have none; `make_semi_split` then decides,
inside the training split, which images keep their boxes (`supervision="box"`), which keep only
image-level labels (`"image"`) and which become unlabeled (`"none"`). Every decision is made per
patient, so a patient's images never sit on both sides of a line, and per stratum (the patient's
rarest class, or "normal"), so every class is represented at every fraction.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import numpy as np

from cxrdistill.data.manifest import ImageRecord, Manifest

NORMAL = "(no finding)"


def _patient_key(image: ImageRecord) -> str:
    return image.patient_id if image.patient_id is not None else f"__image_{image.id}"


def _patients(manifest: Manifest, images: Sequence[ImageRecord]) -> dict[str, list[ImageRecord]]:
    groups: dict[str, list[ImageRecord]] = defaultdict(list)
    for im in images:
        groups[_patient_key(im)].append(im)
    return dict(groups)


def _strata(manifest: Manifest, groups: dict[str, list[ImageRecord]]) -> dict[str, list[str]]:
    """Patients grouped by their rarest class (global frequency), or NORMAL."""
    names = manifest.class_names
    patient_classes: dict[str, set[str]] = {}
    freq: Counter[str] = Counter()
    for patient, ims in groups.items():
        classes = {names[i] for im in ims for i in np.flatnonzero(manifest.image_labels(im.id))}
        patient_classes[patient] = classes
        freq.update(classes)
    strata: dict[str, list[str]] = defaultdict(list)
    for patient in sorted(groups):
        classes = patient_classes[patient]
        key = min(classes, key=lambda c: (freq[c], c)) if classes else NORMAL
        strata[key].append(patient)
    return dict(strata)


def _allocate(sizes: dict[str, int], fractions: Sequence[float]) -> dict[str, list[int]]:
    """Per stratum, how many patients go to each part (largest remainder; totals honoured)."""
    out = {}
    for key, n in sizes.items():
        raw = np.array(fractions, dtype=float) * n
        counts = np.floor(raw).astype(int)
        remainder = n - counts.sum()
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:remainder]] += 1
        out[key] = counts.tolist()
    return out


def _seeded_order(items: list[str], seed: int, salt: str) -> list[str]:
    """A permutation that depends only on the seed and the item names (stable under additions)."""
    return sorted(items, key=lambda s: hashlib.sha256(f"{seed}:{salt}:{s}".encode()).hexdigest())


def _split_patients(manifest: Manifest, images: Sequence[ImageRecord], fractions: Sequence[float],
                    seed: int, salt: str) -> list[set[str]]:
    """Partition the patients of `images` into len(fractions) parts, stratified by class."""
    groups = _patients(manifest, images)
    strata = _strata(manifest, groups)
    alloc = _allocate({k: len(v) for k, v in strata.items()}, fractions)
    parts: list[set[str]] = [set() for _ in fractions]
    for key in sorted(strata):
        ordered = _seeded_order(strata[key], seed, f"{salt}:{key}")
        start = 0
        for part, count in enumerate(alloc[key]):
            parts[part].update(ordered[start:start + count])
            start += count
    return parts


def make_splits(manifest: Manifest, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
                seed: int = 0, overwrite: bool = False) -> Manifest:
    """Assign train/val/test per patient (stratified).

    A manifest that already uses val or test is returned unchanged unless `overwrite`."""
    if not 0 <= val_fraction + test_fraction < 1:
        raise ValueError("val_fraction + test_fraction must lie in [0, 1)")
    if not overwrite and any(im.split != "train" for im in manifest.images):
        return manifest  # the source already has splits
    train, val, test = _split_patients(
        manifest, manifest.images, (1 - val_fraction - test_fraction, val_fraction, test_fraction),
        seed, "split")
    split_of = {p: "train" for p in train} | {p: "val" for p in val} | {p: "test" for p in test}
    return manifest.replace_images([replace(im, split=split_of[_patient_key(im)]) for im in manifest.images])


WeakFraction = float | Literal["rest"]
"""A fraction of training patients, or ``"rest"``: every patient that does not keep boxes."""


def resolve_weak_fraction(boxed_fraction: float, weak_fraction: WeakFraction) -> float:
    """The numeric weak fraction: ``"rest"`` becomes ``1 - boxed_fraction``."""
    if weak_fraction == "rest":
        return max(0.0, 1.0 - boxed_fraction)
    if isinstance(weak_fraction, str):
        raise ValueError(f"weak_fraction must be a number or 'rest', not {weak_fraction!r}")
    return float(weak_fraction)


def make_semi_split(manifest: Manifest, *, boxed_fraction: float, weak_fraction: WeakFraction = 0.0,
                    seed: int = 0, split: str = "train") -> Manifest:
    """Choose supervision inside `split`: `boxed_fraction` of patients keep boxes, `weak_fraction`
    keep image-level labels only (``"rest"``: all the others), the rest become unlabeled. Only images
    that had boxes can be "box"; images with supervision "image" stay weak or become unlabeled.

    The boxed patients depend only on `boxed_fraction` and `seed`, not on `weak_fraction`, so a
    boxes-only recipe and a boxes + image-labels recipe at the same fraction share the same D_B."""
    weak_fraction = resolve_weak_fraction(boxed_fraction, weak_fraction)
    if boxed_fraction < 0 or weak_fraction < 0 or boxed_fraction + weak_fraction > 1 + 1e-9:
        raise ValueError("boxed_fraction and weak_fraction must be >= 0 and sum to at most 1")
    pool = manifest.select(split=split)
    boxed, weak, _ = _split_patients(
        manifest, pool, (boxed_fraction, weak_fraction, max(0.0, 1 - boxed_fraction - weak_fraction)),
        seed, "semi")
    new_images = []
    for im in manifest.images:
        if im.split != split:
            new_images.append(im)
            continue
        key = _patient_key(im)
        if key in boxed:
            kind = "box" if im.supervision == "box" else im.supervision
        elif key in weak:
            kind = "image" if im.supervision in ("box", "image") else "none"
        else:
            kind = "none"
        new_images.append(replace(im, supervision=kind))
    info = dict(manifest.info)
    info["semi_split"] = {"boxed_fraction": boxed_fraction, "weak_fraction": weak_fraction,
                          "seed": seed, "split": split}
    out = manifest.replace_images(new_images)
    out.info = info
    return out
