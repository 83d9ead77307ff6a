"""Generic source adapters (COCO, CSV, TBX11K) and the shared helpers, on tiny fixture folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrdistill.data.manifest import manifest_from_dict
from cxrdistill.data.sources import SOURCES, get_source
from cxrdistill.data.sources.common import hashed_split, iou_xywh, parse_box, read_csv
from cxrdistill.data.sources.vindr import fuse_readers
from cxrdistill.errors import ManifestError

SHARED_TBX = Path(__file__).resolve().parents[2] / "shared" / "data" / "tbx11k-800"


def png(path: Path, width: int = 64, height: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width), dtype=np.uint8)).save(path)


# ---------------------------------------------------------------------------------------------
# helpers


def test_registry_names_and_unknown_source():
    assert set(SOURCES) == {"nih", "mimic", "vindr", "chexpert", "rsna", "tbx11k", "coco", "csv"}
    assert all(callable(get_source(n)) for n in SOURCES)
    with pytest.raises(ValueError, match="unknown source 'kaggle'"):
        get_source("kaggle")


def test_read_csv_line_numbers_survive_multiline_cells(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('a,b\n1,"two\nlines"\n\n3,x\n', encoding="utf-8")
    header, rows = read_csv(path, ["a", "b"])
    assert header == ["a", "b"]
    assert [(line, cells[0]) for line, cells in rows] == [(2, "1"), (5, "3")]
    with pytest.raises(ManifestError, match=r"t.csv:1: missing column\(s\) \['c'\]"):
        read_csv(path, ["c"])


def test_parse_box_and_iou():
    assert parse_box(["1", "2", "5", "7"], "xyxy") == (1.0, 2.0, 4.0, 5.0)
    with pytest.raises(ValueError, match="non-positive"):
        parse_box(["5", "2", "1", "7"], "xyxy")
    with pytest.raises(ValueError, match="not a number"):
        parse_box(["a", "2", "1", "7"])
    assert iou_xywh((0, 0, 2, 2), (1, 0, 2, 2)) == pytest.approx(1 / 3)
    assert iou_xywh((0, 0, 1, 1), (5, 5, 1, 1)) == 0.0


def test_hashed_split_is_stable_and_near_fraction():
    splits = [hashed_split(f"p{i}", 0.2) for i in range(2000)]
    assert splits == [hashed_split(f"p{i}", 0.2) for i in range(2000)]
    assert 0.17 < splits.count("val") / 2000 < 0.23


def test_fuse_readers_policies():
    boxes = [("R1", (10.0, 10.0, 10.0, 10.0)), ("R2", (12.0, 10.0, 10.0, 10.0)),
             ("R3", (50.0, 50.0, 5.0, 5.0)), ("R1", (11.0, 10.0, 10.0, 10.0))]
    wbf = fuse_readers(boxes, "wbf", 0.5)
    # R1 and R2 agree (IoU 0.67) -> averaged; R1's second box cannot join its own cluster
    assert wbf[0] == pytest.approx((11.0, 10.0, 10.0, 10.0))
    assert len(wbf) == 3
    assert len(fuse_readers(boxes, "union")) == 4
    assert fuse_readers(boxes, "first") == [(10.0, 10.0, 10.0, 10.0), (11.0, 10.0, 10.0, 10.0)]


# ---------------------------------------------------------------------------------------------
# COCO


def _coco(images, annotations, categories=({"id": 3, "name": "nodule"}, {"id": 7, "name": "mass"})):
    return {"images": list(images), "annotations": list(annotations), "categories": list(categories)}


def test_coco_merges_files_renumbers_ids_and_sets_splits(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        png(tmp_path / "imgs" / name)
    (tmp_path / "train.json").write_text(json.dumps(_coco(
        [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
         {"id": 2, "file_name": "b.png", "width": 64, "height": 48}],
        [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 10]}])))
    (tmp_path / "val.json").write_text(json.dumps(_coco(
        [{"id": 1, "file_name": "c.png", "width": 64, "height": 48}],
        [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 4, 4]}])))
    raw = get_source("coco")(tmp_path, on_error="strict", images_dir="imgs")
    m = manifest_from_dict(raw, root=tmp_path)
    assert [(im.file_name, im.split) for im in m.images] == [
        ("imgs/a.png", "train"), ("imgs/b.png", "train"), ("imgs/c.png", "val")]
    assert m.class_names == ["nodule", "mass"]
    by_file = {m.image(a.image_id).file_name: m.class_names[m.class_index(a.category_id)] for a in m.annotations}
    assert by_file == {"imgs/a.png": "mass", "imgs/c.png": "nodule"}
    assert raw["skipped"] == [] and raw["info"]["explicit_fields"] == ["split"]


def test_coco_reports_every_bad_record_strict_and_skips_them_lenient(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "train.json").write_text(json.dumps(_coco(
        [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
         {"id": 2, "file_name": "gone.png", "width": 64, "height": 48}],
        [{"id": 1, "image_id": 1, "category_id": 99, "bbox": [1, 2, 10, 10]},
         {"id": 2, "image_id": 1, "category_id": 3, "bbox": [1, 2, -1, 10]},
         {"id": 3, "image_id": 1, "category_id": 3, "bbox": [60, 2, 30, 10]},
         {"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]}])))
    with pytest.raises(ManifestError) as err:
        get_source("coco")(tmp_path, on_error="strict")
    msg = str(err.value)
    assert "4 problem(s)" in msg
    for part in ("image #1 (id 2): image file not found", "annotation #0 (id 1): unknown category_id 99",
                 "annotation #1 (id 2): malformed bbox", "annotation #2 (id 3): malformed bbox [60, 2, 30, 10]: "
                 "box [x=60"):
        assert part in msg
    raw = get_source("coco")(tmp_path, on_error="lenient")
    assert len(raw["skipped"]) == 4
    # an image with a bad box is left out whole: keeping its good boxes would make it a false negative
    assert raw["images"] == [] and raw["annotations"] == []


def test_coco_lenient_keeps_good_images(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    (tmp_path / "x.json").write_text(json.dumps(_coco(
        [{"id": 5, "file_name": "a.png", "width": 64, "height": 48},
         {"id": 6, "file_name": "b.png", "width": 64, "height": 48}],
        [{"id": 1, "image_id": 5, "category_id": 3, "bbox": [1, 2, 3, 4]},
         {"id": 2, "image_id": 6, "category_id": 3, "bbox": [1, 2, 3, "four"]}])))
    raw = get_source("coco")(tmp_path, on_error="lenient")
    m = manifest_from_dict(raw, root=tmp_path)
    assert [im.file_name for im in m.images] == ["a.png"] and [a.bbox for a in m.annotations] == [(1.0, 2.0, 3.0, 4.0)]
    assert "split" not in m.images[0].to_dict() or m.images[0].split == "train"
    assert "explicit_fields" not in raw["info"]


# ---------------------------------------------------------------------------------------------
# CSV


def test_csv_image_rows_with_labels_report_patient(tmp_path):
    png(tmp_path / "img" / "1.png", 40, 30)
    png(tmp_path / "img" / "2.png", 50, 20)
    (tmp_path / "labels.csv").write_text(
        "file,findings,text,pid,part\n"
        "1.png,nodule;effusion,Small nodule.,P1,train\n"
        "2.png,No Finding,Normal chest.,P2,test\n", encoding="utf-8")
    raw = get_source("csv")(tmp_path, on_error="strict", image_col="file", labels_col="findings",
                            label_sep=";", report_col="text", patient_col="pid", split_col="part",
                            images_dir="img")
    m = manifest_from_dict(raw, root=tmp_path)
    a, b = m.images
    assert (a.file_name, a.width, a.height, a.labels, a.report, a.patient_id, a.split, a.supervision) == (
        "img/1.png", 40, 30, ("nodule", "effusion"), "Small nodule.", "P1", "train", "image")
    assert (b.width, b.height, b.labels, b.split) == (50, 20, (), "test")


def test_csv_box_rows_merge_per_image_and_bad_rows_name_their_line(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    (tmp_path / "boxes.csv").write_text(
        "image,label,xmin,ymin,xmax,ymax\n"
        "a.png,nodule,1,1,11,11\n"
        "a.png,mass,20,20,30,40\n"
        "b.png,,,,,\n"
        "b.png,nodule,5,5,2,9\n"            # line 5: x_max < x_min
        "missing.png,nodule,1,1,5,5\n"      # line 6: no file
        "a.png,tumour,1,1,5,5\n"            # line 7: unknown class
        "a.png,nodule,1,1,500,5\n", encoding="utf-8")  # line 8: outside
    kwargs = dict(csv_path="boxes.csv", box_cols=("xmin", "ymin", "xmax", "ymax"), box_label_col="label",
                  box_format="xyxy", classes=["nodule", "mass"])
    with pytest.raises(ManifestError) as err:
        get_source("csv")(tmp_path, on_error="strict", **kwargs)
    msg = str(err.value)
    for part in ("boxes.csv:5: malformed box", "boxes.csv:6: image file not found",
                 "boxes.csv:7: unknown label(s) ['tumour']", "boxes.csv:8: box [x=1"):
        assert part in msg
    raw = get_source("csv")(tmp_path, on_error="lenient", **kwargs)
    assert [s.split(":")[1] for s in raw["skipped"]] == ["5", "6", "7", "8"]
    assert all(s.endswith("skipped)") for s in raw["skipped"])
    assert manifest_from_dict(raw, root=tmp_path).images == []  # a.png and b.png each had a bad row
    good = tmp_path / "good.csv"
    good.write_text("\n".join((tmp_path / "boxes.csv").read_text().splitlines()[:4]) + "\n")
    m = manifest_from_dict(get_source("csv")(tmp_path, on_error="strict", **{**kwargs, "csv_path": "good.csv"}),
                           root=tmp_path)
    assert [im.file_name for im in m.images] == ["a.png", "b.png"]
    assert all(im.supervision == "box" for im in m.images)
    boxes, labels = m.boxes_xyxy(m.images[0].id)
    np.testing.assert_allclose(boxes, [[1, 1, 11, 11], [20, 20, 30, 40]])
    assert labels.tolist() == [0, 1] and m.boxes_xyxy(m.images[1].id)[0].shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# TBX11K


def _voc(path: Path, boxes: list[tuple[str, int, int, int, int]], width: int = 64, height: int = 64) -> None:
    objects = "".join(f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                      f"<ymax>{d}</ymax></bndbox></object>" for n, a, b, c, d in boxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{path.stem}.png</filename><size><width>{width}</width>"
                    f"<height>{height}</height><depth>3</depth></size>{objects}</annotation>")


def test_tbx11k_voc_layout(tmp_path):
    png(tmp_path / "imgs" / "tb" / "tb0001.png", 64, 64)
    png(tmp_path / "imgs" / "health" / "h0001.png", 64, 64)
    png(tmp_path / "imgs" / "tb" / "tb0002.png", 64, 64)
    _voc(tmp_path / "annotations" / "xml" / "tb0001.xml", [("ActiveTuberculosis", 4, 5, 20, 30),
                                                            ("ObsoletePulmonaryTuberculosis", 30, 30, 40, 50)])
    _voc(tmp_path / "annotations" / "xml" / "tb0002.xml", [("ActiveTuberculosis", 4, 5, 2, 30)])
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "TBX11K_train.txt").write_text("tb/tb0001.png\nhealth/h0001.png\n")
    (tmp_path / "lists" / "TBX11K_val.txt").write_text("tb/tb0002.png\ntb/tb9999.png\n")
    with pytest.raises(ManifestError, match=r"TBX11K_val.txt:2: image file not found"):
        get_source("tbx11k")(tmp_path, on_error="strict")
    raw = get_source("tbx11k")(tmp_path, on_error="lenient")
    assert len(raw["skipped"]) == 2 and "tb0002.xml: object #0: malformed box" in raw["skipped"][0]
    m = manifest_from_dict(raw, root=tmp_path)
    assert [(im.file_name, im.split, im.labels, im.supervision) for im in m.images] == [
        ("imgs/tb/tb0001.png", "train", ("ActiveTuberculosis", "ObsoletePulmonaryTuberculosis"), "box"),
        ("imgs/health/h0001.png", "train", (), "box")]
    assert m.annotations[0].bbox == (4.0, 5.0, 16.0, 25.0)


@pytest.mark.skipif(not SHARED_TBX.is_dir(), reason="real TBX11K subset not on this machine")
def test_tbx11k_real_800_subset_loads():
    raw = get_source("tbx11k")(SHARED_TBX, on_error="strict")
    m = manifest_from_dict(raw, root=SHARED_TBX)
    assert len(m.images) == 800 and len(m.annotations) == 1211
    assert sum(im.split == "val" for im in m.images) == 200
    assert m.class_names == ["ActiveTuberculosis", "ObsoletePulmonaryTuberculosis"]
