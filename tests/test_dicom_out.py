"""`cxrdistill predict --dicom-sr / --dicom-seg`: objects read back with pydicom / highdicom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cxrdistill.cli import app
from cxrdistill.config import ModelConfig
from cxrdistill.models.factory import build_model, export_model

hd = pytest.importorskip("highdicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

CLASSES = ["nodule", "effusion"]


def _tiny_dicom(path: Path, seed: int, patient: str) -> Dataset:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((56, 64)) * 3000).astype(np.uint16)
    pixels[10:30, 20:40] += 1000
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientSex, ds.Modality = patient, f"ID-{seed}", "F", "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture()
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    sources = [_tiny_dicom(images / f"im{i}.dcm", i, f"Test^Patient{i}") for i in range(3)]
    from PIL import Image

    Image.fromarray((np.arange(400).reshape(20, 20) % 251).astype(np.uint8)).save(images / "plain.png")
    return images, sources


def _model(kind, tmp_path, options):
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, depth=18, base_width=8, options=options)
    export_model(tmp_path / "run" / "model.pt", build_model(cfg, len(CLASSES)), cfg, CLASSES, image_size=32)
    return tmp_path / "run"


def test_sr_per_dicom_references_source_with_boxes_classes_scores(folder, tmp_path):
    images, sources = folder
    run = _model("detector", tmp_path, {"fpn_channels": 16, "head_convs": 1, "fpn_levels": [3, 4, 5]})
    out, sr_dir = tmp_path / "pred", tmp_path / "sr"
    res = CliRunner().invoke(app, ["predict", "-m", str(run), "--images", str(images), "-o", str(out),
                                   "--score-thresh", "0.0", "--dicom-sr", str(sr_dir)])
    assert res.exit_code == 0, res.output
    assert "1 input(s) are not DICOM" in res.output
    rows = json.loads((out / "predictions.json").read_text())
    manifest = json.loads((out / "images_manifest.json").read_text())
    id_of = {im["file_name"]: im["id"] for im in manifest["images"]}
    assert len(list(sr_dir.glob("*.dcm"))) == 3
    for i, src in enumerate(sources):
        sr = hd.sr.srread(sr_dir / f"{src.SOPInstanceUID}.dcm")
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        assert str(sr.PatientName) == f"Test^Patient{i}" and sr.PatientID == f"ID-{i}"
        assert sr.StudyInstanceUID == src.StudyInstanceUID
        assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        mine = sorted((r for r in rows if r["image_id"] == id_of[f"im{i}.dcm"]), key=lambda r: -r["score"])
        groups = sr.content.get_planar_roi_measurement_groups()
        assert len(groups) == len(mine) > 0
        for g, r in zip(groups, mine):
            x, y, w, h = r["bbox"]
            np.testing.assert_allclose(g.roi.value, [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]],
                                       atol=1e-3)
            assert g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
            assert g.finding_type.meaning == CLASSES[r["category_id"] - 1]
            assert g.get_measurements()[0].value == pytest.approx(r["score"], abs=1e-6)


def test_seg_of_heatmap_model_is_fractional_and_fits_source(folder, tmp_path):
    images, sources = folder
    run = _model("heatmap", tmp_path, {"fpn_channels": 16})
    seg_dir = tmp_path / "seg"
    res = CliRunner().invoke(app, ["predict", "-m", str(run), "--images", str(images), "-o", str(tmp_path / "p"),
                                   "--dicom-seg", str(seg_dir)])
    assert res.exit_code == 0, res.output
    scores = json.loads((tmp_path / "p" / "image_scores.json").read_text())
    manifest = json.loads((tmp_path / "p" / "images_manifest.json").read_text())
    for i, src in enumerate(sources):
        seg = hd.seg.segread(seg_dir / f"{src.SOPInstanceUID}.dcm")
        assert seg.SegmentationType == "FRACTIONAL" and seg.number_of_segments == len(CLASSES)
        assert str(seg.PatientName) == f"Test^Patient{i}"
        assert seg.get_source_image_uids()[0][2] == src.SOPInstanceUID
        arr = seg.get_pixels_by_source_instance([src.SOPInstanceUID], combine_segments=False)
        assert arr.shape == (1, 56, 64, 2)
        iid = next(im["id"] for im in manifest["images"] if im["file_name"] == f"im{i}.dcm")
        for k in range(2):
            want = next(s["score"] for s in scores if s["image_id"] == iid and s["category_id"] == k + 1)
            assert abs(float(arr[0, :, :, k].max()) - want) < 0.02  # 8-bit fractions, bilinear resize


def test_seg_needs_heatmap_model(folder, tmp_path):
    images, _ = folder
    run = _model("detector", tmp_path, {"fpn_channels": 16, "head_convs": 1, "fpn_levels": [3, 4, 5]})
    res = CliRunner().invoke(app, ["predict", "-m", str(run), "--images", str(images), "-o", str(tmp_path / "p"),
                                   "--dicom-seg", str(tmp_path / "seg")])
    assert res.exit_code == 2 and "needs a heat-map model" in res.output


def test_source_without_uids_is_refused(tmp_path):
    from cxrdistill.errors import CxrDistillError
    from cxrdistill.interop.dicom_out import boxes_to_sr

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    with pytest.raises(CxrDistillError, match="StudyInstanceUID"):
        boxes_to_sr(ds, [], CLASSES, [1, 2])
