"""Semi-supervised splits: patient-level, seeded, stratified, fractions honoured."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from cxrdistill.data.manifest import manifest_from_dict
from cxrdistill.data.splits import make_semi_split, make_splits


def _manifest(n_patients: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(["common", "rare", "mid"])]
    images, anns = [], []
    aid = 0
    for p in range(n_patients):
        n_img = 1 + int(rng.random() < 0.3)
        cls = rng.choice([0, 1, 2, -1], p=[0.5, 0.06, 0.2, 0.24])
        for _ in range(n_img):
            iid = len(images) + 1
            images.append({"id": iid, "file_name": f"{iid}.png", "width": 64, "height": 64,
                           "patient_id": f"p{p}"})
            if cls >= 0:
                aid += 1
                anns.append({"id": aid, "image_id": iid, "category_id": int(cls) + 1, "bbox": [5, 5, 10, 10]})
    return manifest_from_dict({"categories": cats, "images": images, "annotations": anns},
                              root=".", check_files=False)


def _patient_sets(m, key):
    out = defaultdict(set)
    for im in m.images:
        out[im.patient_id].add(getattr(im, key))
    return out


def test_make_splits_keeps_patients_together_and_honours_fractions():
    m = make_splits(_manifest(), val_fraction=0.2, test_fraction=0.2, seed=1)
    assert all(len(s) == 1 for s in _patient_sets(m, "split").values())
    patients = defaultdict(set)
    for im in m.images:
        patients[im.split].add(im.patient_id)
    total = sum(len(v) for v in patients.values())
    assert abs(len(patients["test"]) / total - 0.2) < 0.03
    assert abs(len(patients["val"]) / total - 0.2) < 0.03
    # stratified: the rare class shows up in every split
    for split in ("train", "val", "test"):
        assert any(m.image_labels(im.id)[1] for im in m.select(split=split))


@pytest.mark.parametrize("boxed,weak", [(0.05, 0.0), (0.1, 0.3), (0.2, 0.5), (1.0, 0.0)])
def test_semi_split_fractions_patient_level_and_stratified(boxed, weak):
    m = make_semi_split(_manifest(), boxed_fraction=boxed, weak_fraction=weak, seed=3)
    assert all(len(s) == 1 for s in _patient_sets(m, "supervision").values())
    patients = defaultdict(set)
    for im in m.images:
        patients[im.supervision].add(im.patient_id)
    total = len({im.patient_id for im in m.images})
    assert abs(len(patients["box"]) / total - boxed) <= 0.02 + 3 / total
    assert abs(len(patients["image"]) / total - weak) <= 0.02 + 3 / total
    # stratified: each class has boxed examples once the fraction is not tiny
    if boxed >= 0.1:
        for c in range(3):
            assert any(m.image_labels(im.id)[c] for im in m.select(supervision="box"))


def test_semi_split_is_deterministic_and_seed_dependent():
    base = _manifest()
    a = make_semi_split(base, boxed_fraction=0.1, seed=0)
    b = make_semi_split(base, boxed_fraction=0.1, seed=0)
    c = make_semi_split(base, boxed_fraction=0.1, seed=1)
    sup = lambda m: [im.supervision for im in m.images]  # noqa: E731
    assert sup(a) == sup(b)
    assert sup(a) != sup(c)


def test_semi_split_nested_fractions_grow_monotonically():
    """More boxes at a larger fraction never removes a patient chosen at a smaller one, per stratum order."""
    base = _manifest()
    small = {im.patient_id for im in make_semi_split(base, boxed_fraction=0.05, seed=0).select(supervision="box")}
    large = {im.patient_id for im in make_semi_split(base, boxed_fraction=0.2, seed=0).select(supervision="box")}
    assert small <= large


@pytest.mark.parametrize("boxed", [0.1, 0.2, 0.4])
def test_semi_split_weak_rest_keeps_the_same_boxed_patients(boxed):
    """``weak_fraction="rest"``: every non-boxed patient keeps image labels, and D_B is the one a
    boxes-only split draws, so the two kinds of recipe are compared on the same boxes."""
    base = _manifest()
    boxes_only = make_semi_split(base, boxed_fraction=boxed, weak_fraction=0.0, seed=2)
    with_weak = make_semi_split(base, boxed_fraction=boxed, weak_fraction="rest", seed=2)
    box_ids = lambda m: {im.id for im in m.select(supervision="box")}  # noqa: E731
    assert box_ids(boxes_only) == box_ids(with_weak)
    train = with_weak.select(split="train")
    assert {im.supervision for im in train} == {"box", "image"}
    assert len(with_weak.select(supervision="image")) == len(train) - len(box_ids(with_weak))
    with pytest.raises(ValueError, match="rest"):
        make_semi_split(base, boxed_fraction=boxed, weak_fraction="all", seed=2)  # type: ignore[arg-type]
