"""Manifest validation: every bad record is named, strict stops, lenient skips and lists."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from cxrdistill.data.manifest import load_manifest, manifest_from_dict
from cxrdistill.errors import ManifestError


def _good(tmp_path: Path) -> dict:
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    return {
        "categories": [{"id": 1, "name": "nodule"}, {"id": 2, "name": "effusion"}],
        "images": [
            {"id": 1, "file_name": "a.png", "width": 100, "height": 80, "split": "train",
             "supervision": "box", "labels": ["nodule"], "report": "Small nodule.", "patient_id": "p1"},
            {"id": 2, "file_name": "b.png", "width": 100, "height": 80, "split": "train",
             "supervision": "none", "report": "Clear lungs.", "patient_id": "p2"},
            {"id": 3, "file_name": "c.png", "width": 100, "height": 80, "split": "test",
             "supervision": "image", "labels": ["effusion"], "patient_id": "p3"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 15]},
            {"id": 11, "image_id": 2, "category_id": 2, "bbox": [50, 40, 30, 30]},
        ],
    }


def test_valid_manifest_loads_with_classes_boxes_and_labels(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(_good(tmp_path)))
    m = load_manifest(path)
    assert m.class_names == ["nodule", "effusion"]
    assert not m.skipped
    boxes, labels = m.boxes_xyxy(1)
    np.testing.assert_allclose(boxes, [[10, 10, 30, 25]])
    assert labels.tolist() == [0]
    np.testing.assert_array_equal(m.image_labels(3), [0, 1])
    assert [im.id for im in m.select(split="train", supervision="box")] == [1]
    # round trip
    m.save(tmp_path / "m2.json")
    again = load_manifest(tmp_path / "m2.json")
    assert again.to_dict() == m.to_dict()
    coco = m.to_coco_dict(split="train")
    assert {im["id"] for im in coco["images"]} == {1, 2}


def _mutate(raw: dict, what: str) -> tuple[dict, str]:
    """Apply one kind of damage; return the raw dict and a phrase the error must contain."""
    r = copy.deepcopy(raw)
    if what == "missing_file":
        r["images"][0]["file_name"] = "nope.png"
        return r, "image file not found"
    if what == "box_outside":
        r["annotations"][0]["bbox"] = [90, 10, 30, 10]
        return r, "outside the 100 x 80 image"
    if what == "box_nonpositive":
        r["annotations"][0]["bbox"] = [10, 10, 0, 5]
        return r, "non-positive size"
    if what == "box_nan":
        r["annotations"][0]["bbox"] = [10, float("nan"), 5, 5]
        return r, "NaN"
    if what == "unknown_category":
        r["annotations"][0]["category_id"] = 9
        return r, "unknown category_id 9"
    if what == "unknown_label":
        r["images"][2]["labels"] = ["dragon"]
        return r, "unknown class name(s) in labels: ['dragon']"
    if what == "duplicate_id":
        r["images"][1]["id"] = 1
        return r, "duplicate image id"
    if what == "patient_leak":
        r["images"][2]["patient_id"] = "p1"
        return r, "appears in several splits"
    if what == "labels_contradict":
        r["images"][0]["labels"] = ["effusion"]
        return r, "contradict its boxes"
    if what == "escape_root":
        r["images"][0]["file_name"] = "../../etc/passwd"
        return r, "escapes the data root"
    if what == "absolute_path":
        r["images"][0]["file_name"] = "/etc/passwd"
        return r, "absolute file_name refused"
    if what == "bad_split":
        r["images"][0]["split"] = "training"
        return r, "unknown split 'training'"
    if what == "bad_supervision":
        r["images"][0]["supervision"] = "boxes"
        return r, "unknown supervision 'boxes'"
    if what == "missing_key":
        del r["images"][0]["width"]
        return r, "missing required key(s) ['width']"
    raise AssertionError(what)


CASES = ["missing_file", "box_outside", "box_nonpositive", "box_nan", "unknown_category",
         "unknown_label", "duplicate_id", "patient_leak", "labels_contradict", "escape_root",
         "absolute_path", "bad_split", "bad_supervision", "missing_key"]


@pytest.mark.parametrize("case", CASES)
def test_each_bad_record_is_named_in_strict_mode(tmp_path, case):
    raw, phrase = _mutate(_good(tmp_path), case)
    with pytest.raises(ManifestError) as err:
        manifest_from_dict(raw, root=tmp_path, on_error="strict")
    assert phrase in str(err.value)


@pytest.mark.parametrize("case", CASES)
def test_lenient_mode_skips_and_lists_without_silent_loss(tmp_path, case):
    raw, phrase = _mutate(_good(tmp_path), case)
    m = manifest_from_dict(raw, root=tmp_path, on_error="lenient")
    assert any(phrase in str(issue) for issue in m.skipped)
    # every input record is either kept or listed
    n_in_images = len(raw["images"])
    listed_images = {str(i).split(":")[0] for i in m.skipped if str(i).startswith("image")}
    assert len(m.images) + len(listed_images) >= n_in_images - (1 if case == "duplicate_id" else 0)
    kept_ann = {a.id for a in m.annotations}
    for ann in raw["annotations"]:
        if ann["id"] not in kept_ann:
            assert any(f"annotation {ann['id']}" in str(i) for i in m.skipped)


def test_allow_outside_root_permits_absolute_paths(tmp_path):
    raw = _good(tmp_path)
    raw["images"][0]["file_name"] = str(tmp_path / "a.png")
    with pytest.raises(ManifestError, match="absolute file_name refused"):
        manifest_from_dict(raw, root=tmp_path, on_error="strict")
    m = manifest_from_dict(raw, root=tmp_path, on_error="strict", allow_outside_root=True,
                           check_files=True)
    assert m.image_path(1) == tmp_path / "a.png"


def test_not_json_and_missing_top_level_keys(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ManifestError, match="missing required key"):
        load_manifest(bad)
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ManifestError, match="UTF-8"):
        load_manifest(bad)
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "absent.json")


def test_empty_report_is_listed_and_treated_as_missing(tmp_path):
    raw = _good(tmp_path)
    raw["images"][0]["report"] = "   "
    m = manifest_from_dict(raw, root=tmp_path, on_error="lenient")
    assert m.image(1).report is None
    assert any("empty report" in str(i) for i in m.skipped)


def test_strict_lists_every_problem_at_once(tmp_path):
    raw = _good(tmp_path)
    raw["annotations"][0]["bbox"] = [10, 10, -1, 5]
    raw["images"][2]["labels"] = ["dragon"]
    with pytest.raises(ManifestError) as err:
        manifest_from_dict(raw, root=tmp_path)
    text = str(err.value)
    assert "2 problem(s)" in text and "annotation 10" in text and "image 3" in text
