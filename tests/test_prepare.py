"""`cxrdistill prepare`: COCO + folder, CSV + folder, re-split; the written manifest loads anywhere."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cxrdistill.cli import app
from cxrdistill.data.manifest import load_manifest


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray((np.random.default_rng(i).random((40, 50)) * 255).astype(np.uint8)).save(folder / f"im{i}.png")


def test_prepare_from_coco_writes_a_split_manifest_elsewhere(tmp_path):
    _images(tmp_path / "data" / "imgs", 40)
    coco = {"categories": [{"id": 1, "name": "nodule"}, {"id": 2, "name": "mass"}],
            "images": [{"id": i + 1, "file_name": f"imgs/im{i}.png", "width": 50, "height": 40} for i in range(40)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [5, 5, 10, 8]}
                            for i in range(30)]}
    (tmp_path / "data" / "boxes.json").write_text(json.dumps(coco))
    out = tmp_path / "out" / "m.json"
    res = CliRunner().invoke(app, ["prepare", "--coco", str(tmp_path / "data" / "boxes.json"), "--images",
                                   str(tmp_path / "data"), "-o", str(out), "--boxed-fraction", "0.25",
                                   "--weak-fraction", "0.25", "--check-images"])
    assert res.exit_code == 0, res.output
    m = load_manifest(out, check_images=True)
    assert len(m.images) == 40 and len(m.annotations) == 30
    assert {im.split for im in m.images} == {"train", "val", "test"}
    assert {im.supervision for im in m.select(split="train")} == {"box", "image", "none"}
    # --weak-fraction rest: every training patient without boxes keeps its image labels
    args = ["prepare", "--coco", str(tmp_path / "data" / "boxes.json"), "--images", str(tmp_path / "data"),
            "-o", str(tmp_path / "rest.json"), "--boxed-fraction", "0.25"]
    res = CliRunner().invoke(app, [*args, "--weak-fraction", "rest"])
    assert res.exit_code == 0, res.output
    rest = load_manifest(tmp_path / "rest.json")
    assert {im.supervision for im in rest.select(split="train")} == {"box", "image"}
    assert {im.id for im in rest.select(supervision="box")} == {im.id for im in m.select(supervision="box")}
    bad = CliRunner().invoke(app, [*args, "--weak-fraction", "most"])
    assert bad.exit_code == 2 and "rest" in bad.output


def test_prepare_reports_bad_rows_and_honours_strict_and_lenient(tmp_path):
    _images(tmp_path / "imgs", 6)
    rows = ["image,finding,report"] + [f"imgs/im{i}.png,nodule,Small nodule." for i in range(5)]
    rows.append("imgs/missing.png,nodule,Nodule.")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    args = ["prepare", "--csv", str(tmp_path / "labels.csv"), "--images", str(tmp_path), "-o",
            str(tmp_path / "m.json"), "--option", "labels_col=finding", "--option", "report_col=report"]
    strict = CliRunner().invoke(app, args)
    assert strict.exit_code == 2 and "missing.png" in strict.output
    lenient = CliRunner().invoke(app, [*args, "--lenient"])
    assert lenient.exit_code == 0, lenient.output
    assert "missing.png" in lenient.output and "1 record(s) skipped" in lenient.output
    m = load_manifest(tmp_path / "m.json")
    assert len(m.images) == 5 and all(im.report == "Small nodule." for im in m.images)


def test_prepare_resplits_an_existing_manifest(tmp_path):
    _images(tmp_path / "imgs", 20)
    coco = {"categories": [{"id": 1, "name": "a"}],
            "images": [{"id": i + 1, "file_name": f"imgs/im{i}.png", "width": 50, "height": 40,
                        "split": "train" if i < 16 else "test"} for i in range(20)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 1, 5, 5]} for i in range(20)]}
    (tmp_path / "m.json").write_text(json.dumps(coco))
    res = CliRunner().invoke(app, ["prepare", "--manifest", str(tmp_path / "m.json"), "-o",
                                   str(tmp_path / "s.json"), "--boxed-fraction", "0.5"])
    assert res.exit_code == 0, res.output
    m = load_manifest(tmp_path / "s.json")
    assert len(m.select(split="test")) == 4  # existing splits kept
    assert len(m.select(split="train", supervision="box")) == 8


def test_prepare_merges_coco_boxes_into_a_csv_manifest(tmp_path):
    _images(tmp_path / "imgs", 8)
    rows = ["image,report,patient"] + [f"imgs/im{i}.png,Report {i}.,p{i}" for i in range(8)]
    (tmp_path / "reports.csv").write_text("\n".join(rows) + "\n")
    coco = {"categories": [{"id": 7, "name": "nodule"}],
            "images": [{"id": 1, "file_name": "imgs/im0.png"}, {"id": 2, "file_name": "imgs/im3.png"},
                       {"id": 3, "file_name": "imgs/nope.png"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 2, 8, 8]},
                            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [10, 10, 5, 5]},
                            {"id": 3, "image_id": 3, "category_id": 7, "bbox": [1, 1, 2, 2]}]}
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    args = ["prepare", "--csv", str(tmp_path / "reports.csv"), "--images", str(tmp_path), "-o",
            str(tmp_path / "m.json"), "--option", "report_col=report", "--option", "patient_col=patient",
            "--boxes", str(tmp_path / "boxes.json")]
    strict = CliRunner().invoke(app, args)
    assert strict.exit_code == 2 and "nope.png" in strict.output
    res = CliRunner().invoke(app, [*args, "--lenient"])
    assert res.exit_code == 0, res.output
    m = load_manifest(tmp_path / "m.json")
    boxed = {m.image(a.image_id).file_name for a in m.annotations}
    assert boxed == {"imgs/im0.png", "imgs/im3.png"}
    assert all(m.image(a.image_id).supervision == "box" for a in m.annotations)
    assert m.class_names == ["nodule"] and all(im.report for im in m.images)
