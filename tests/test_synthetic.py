"""The synthetic chest X-ray world: determinism, exact boxes, class coverage, reports, speed."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cxrdistill.data.io import read_image
from cxrdistill.data.manifest import load_manifest
from cxrdistill.data.synthetic import SYNTHETIC_CLASSES, make_world, render_image, sample_lesion
from cxrdistill.errors import ConfigError

# Independent of the generator's templates: which words name a class, which words deny it.
KEYWORDS = {
    "nodule": ("nodul",),
    "pleural effusion": ("effusion", "pleural fluid", "costophrenic", "layering fluid"),
    "consolidation": ("consolidation", "airspace", "pneumonia"),
    "cardiomegaly": ("cardiomegaly", "heart", "cardiac silhouette"),
    "pneumothorax": ("pneumothorax", "pleural line"),
}
NEGATION = re.compile(r"\b(no|without|normal|sharp|not)\b")


def asserted_by_text(report: str) -> set[str]:
    """Classes some sentence of ``report`` mentions without denying them."""
    found = set()
    for sentence in re.split(r"[.:]\s*", report.lower()):
        if NEGATION.search(sentence):
            continue
        found |= {c for c, words in KEYWORDS.items() if any(w in sentence for w in words)}
    return found


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_same_seed_gives_same_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    a = make_world(tmp_path / "a", n_images=8, image_size=48, seed=3)
    b = make_world(tmp_path / "b", n_images=8, image_size=48, seed=3)
    c = make_world(tmp_path / "c", n_images=8, image_size=48, seed=4)
    assert a.read_bytes() == b.read_bytes()
    for name in sorted((tmp_path / "a" / "images").iterdir()):
        assert name.read_bytes() == (tmp_path / "b" / "images" / name.name).read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert (tmp_path / "a/images/000001.png").read_bytes() != (tmp_path / "c/images/000001.png").read_bytes()


def test_manifest_is_valid_extended_coco(tmp_path: Path) -> None:
    path = make_world(tmp_path, n_images=40, image_size=64, seed=1, bit_depth=16)
    manifest = load_manifest(path, check_images=True)  # strict: raises on any problem
    raw = load(path)
    assert manifest.class_names == list(SYNTHETIC_CLASSES)
    assert [c["id"] for c in raw["categories"]] == [1, 2, 3, 4, 5]
    assert raw["info"]["seed"] == 1 and raw["info"]["report_error_rate"] == 0.1
    names = {c["id"]: c["name"] for c in raw["categories"]}
    boxed: dict[int, set[str]] = {}
    for ann in raw["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 0 and h > 0
        assert ann["area"] == pytest.approx(w * h) and ann["iscrowd"] == 0
        boxed.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    for im in raw["images"]:
        assert im["supervision"] == "box" and im["split"] in ("train", "val", "test")
        assert set(im["labels"]) == boxed.get(im["id"], set())
        assert set(im["report_truth"]["present"]) == set(im["labels"])
    pixels = read_image(manifest.image_path(manifest.images[0]))
    assert pixels.shape == (64, 64) and 0.0 <= pixels.min() < 0.1 and pixels.max() > 0.7
    # patients: some have two images, and a patient never spans two splits
    per_patient = Counter(im["patient_id"] for im in raw["images"])
    assert max(per_patient.values()) >= 2
    splits_of: dict[str, set[str]] = {}
    for im in raw["images"]:
        splits_of.setdefault(im["patient_id"], set()).add(im["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    assert Counter(im["split"] for im in raw["images"])["train"] == pytest.approx(28, abs=2)


def test_normal_fraction_patients_and_every_class_present(tmp_path: Path) -> None:
    raw = load(make_world(tmp_path, n_images=20, image_size=32, seed=5, n_patients=12,
                          normal_fraction=0.3, classes=["pneumothorax", "nodule", "cardiomegaly",
                                                       "consolidation", "pleural effusion"]))
    assert [c["name"] for c in raw["categories"]][0] == "pneumothorax"
    assert sum(not im["labels"] for im in raw["images"]) == 6
    assert len({im["patient_id"] for im in raw["images"]}) == 12
    assert {a["category_id"] for a in raw["annotations"]} == {1, 2, 3, 4, 5}
    assert all(1 <= len(set(im["labels"])) <= 3 for im in raw["images"] if im["labels"])


@pytest.mark.parametrize("kind", SYNTHETIC_CLASSES)
def test_box_covers_exactly_what_the_lesion_changes(kind: str) -> None:
    peaks = []
    for seed in range(5):
        lesion = sample_lesion(np.random.default_rng(seed), kind)
        with_lesion, boxes = render_image(np.random.default_rng(100 + seed), 96, [lesion])
        without, none = render_image(np.random.default_rng(100 + seed), 96, [])
        assert none.shape == (0, 4) and boxes.shape == (1, 4)
        x0, y0, x1, y1 = boxes[0].astype(int)
        change = np.abs(with_lesion - without)
        inside = change[y0:y1, x0:x1].sum()
        assert inside >= 0.95 * change.sum() > 0
        peaks.append(change[y0:y1, x0:x1].max())
        # tight: the changed pixels reach (nearly) every edge of the box
        rows = np.flatnonzero(change.any(axis=1))
        cols = np.flatnonzero(change.any(axis=0))
        assert abs(rows[0] - y0) <= 2 and abs(rows[-1] + 1 - y1) <= 2
        assert abs(cols[0] - x0) <= 2 and abs(cols[-1] + 1 - x1) <= 2
    # visible: faint lesions exist, but typically a lesion stands well above the pixel noise
    assert min(peaks) > 0.02 and np.median(peaks) > 0.06


def test_lesion_sizes_vary() -> None:
    areas = {k: [] for k in ("nodule", "consolidation", "pleural effusion")}
    for seed in range(12):
        for kind in areas:
            lesion = sample_lesion(np.random.default_rng(seed), kind)
            _, boxes = render_image(np.random.default_rng(seed), 128, [lesion])
            areas[kind].append(float((boxes[0, 2] - boxes[0, 0]) * (boxes[0, 3] - boxes[0, 1])))
    for kind, values in areas.items():
        assert max(values) > 2.0 * min(values), kind


def test_reports_without_errors_state_exactly_the_truth(tmp_path: Path) -> None:
    raw = load(make_world(tmp_path, n_images=120, image_size=32, seed=2, report_error_rate=0.0))
    negated = 0
    for im in raw["images"]:
        assert asserted_by_text(im["report"]) == set(im["labels"]), im["report"]
        assert not im["report_truth"]["error"]
        negated += bool(im["report_truth"]["negated"])
    assert negated > 60  # absent findings are often denied explicitly
    texts = " ".join(im["report"].lower() for im in raw["images"])
    for phrase in ("no pneumothorax", "possible", "lungs are clear", "no acute cardiopulmonary",
                   "costophrenic", "left", "right"):
        assert phrase in texts


def test_report_error_rate_is_measured_in_the_text(tmp_path: Path) -> None:
    raw = load(make_world(tmp_path, n_images=300, image_size=32, seed=7, report_error_rate=0.3))
    wrong = [asserted_by_text(im["report"]) != set(im["labels"]) for im in raw["images"]]
    assert wrong == [im["report_truth"]["error"] for im in raw["images"]]
    assert np.mean(wrong) == pytest.approx(0.3, abs=0.08)
    kinds = Counter("missed" if im["report_truth"]["missed"] else "hallucinated"
                    for im in raw["images"] if im["report_truth"]["error"])
    assert kinds["missed"] > 10 and kinds["hallucinated"] > 10


def test_bad_parameters_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown class"):
        make_world(tmp_path, n_images=4, classes=["nodule", "fracture"])
    with pytest.raises(ConfigError, match="splits"):
        make_world(tmp_path, n_images=4, splits=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="n_patients"):
        make_world(tmp_path, n_images=4, n_patients=9)


def test_two_hundred_images_build_in_a_few_seconds(tmp_path: Path) -> None:
    start = time.process_time()  # CPU time: robust to other jobs sharing the machine
    make_world(tmp_path, n_images=200, image_size=128, seed=0)
    assert time.process_time() - start < 6.0
