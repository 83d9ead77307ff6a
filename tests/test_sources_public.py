"""Public-dataset adapters (ChestX-ray14, CheXpert, MIMIC-CXR + MS-CXR, VinDr-CXR, RSNA) on tiny
fixture folders written in each release's real file names and column layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrdistill.data.manifest import manifest_from_dict
from cxrdistill.data.sources import get_source
from cxrdistill.data.sources.mimic import report_sections
from cxrdistill.errors import ManifestError


def png(path: Path, width: int = 64, height: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (height, width), dtype=np.uint8)).save(path)


def dicom(path: Path, width: int = 64, height: int = 48, view: str = "PA",
          photometric: str = "MONOCHROME2") -> None:
    """A tiny, valid DICOM radiograph."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = "DX", view
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(width * height, dtype=np.uint16) % 4096).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# NIH ChestX-ray14

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n")


def _nih(root: Path, extra_rows: str = "", box_rows: str = "") -> None:
    for name in ("00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png"):
        png(root / "images_001" / "images" / name, 64, 64)
    write(root / "Data_Entry_2017.csv", NIH_HEADER
          + "00000001_000.png,Cardiomegaly|Effusion,0,1,058Y,M,PA,2682,2749,0.143,0.143,\n"
          + "00000001_001.png,No Finding,1,1,058Y,M,AP,2894,2729,0.143,0.143,\n"
          + "00000002_000.png,Infiltration,0,2,081Y,F,PA,2500,2048,0.168,0.168,\n"
          + "00000003_000.png,Nodule,0,3,074Y,F,PA,2500,2048,0.168,0.168,\n" + extra_rows)
    write(root / "BBox_List_2017.csv", "Image Index,Finding Label,Bbox [x,y,w,h],,,,,,\n"
          "00000001_000.png,Cardiomegaly,10.5,20.25,30,20,,,\n"
          "00000002_000.png,Infiltrate,5,5,10,10,,,\n" + box_rows)
    write(root / "train_val_list.txt", "00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    write(root / "test_list.txt", "00000003_000.png\n")


def test_nih_labels_boxes_splits(tmp_path):
    _nih(tmp_path)
    raw = get_source("nih")(tmp_path, on_error="strict", val_fraction=0.0)
    m = manifest_from_dict(raw, root=tmp_path)
    ims = {Path(im.file_name).name: im for im in m.images}
    a = ims["00000001_000.png"]
    assert a.file_name == "images_001/images/00000001_000.png"
    assert (a.labels, a.supervision, a.patient_id, a.split) == (("Cardiomegaly", "Effusion"), "box", "1", "train")
    assert a.extra["original_size"] == [2682, 2749] and a.extra["view_position"] == "PA"
    assert ims["00000001_001.png"].labels == () and ims["00000001_001.png"].supervision == "image"
    assert ims["00000003_000.png"].split == "test"
    boxes, labels = m.boxes_xyxy(a.id)
    np.testing.assert_allclose(boxes, [[10.5, 20.25, 40.5, 40.25]])
    assert [m.class_names[i] for i in labels] == ["Cardiomegaly"]
    # the box list's "Infiltrate" is the labels' "Infiltration"
    assert m.class_names[m.boxes_xyxy(ims["00000002_000.png"].id)[1][0]] == "Infiltration"
    assert len(m.class_names) == 14


def test_nih_bad_rows_are_named_with_file_and_line(tmp_path):
    _nih(tmp_path, extra_rows="00000009_000.png,Nodule,0,9,030Y,F,PA,1,1,0.1,0.1,\n"
                              "00000003_000.png,Tumour,0,3,074Y,F,PA,1,1,0.1,0.1,\n",
         box_rows="00000003_000.png,Nodule,60,60,30,30,,,\n")
    with pytest.raises(ManifestError) as err:
        get_source("nih")(tmp_path, on_error="strict")
    msg = str(err.value)
    assert "Data_Entry_2017.csv:6: image file not found: 00000009_000.png" in msg
    assert "Data_Entry_2017.csv:7: duplicate image 00000003_000.png" in msg
    assert "BBox_List_2017.csv:4: 00000003_000.png: box [x=60, y=60, w=30, h=30] lies outside" in msg
    raw = get_source("nih")(tmp_path, on_error="lenient")
    assert len(raw["skipped"]) == 3
    names = [Path(im["file_name"]).name for im in raw["images"]]
    assert "00000003_000.png" not in names and len(names) == 3


# ---------------------------------------------------------------------------------------------
# CheXpert

CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
                   "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
                   "Pleural Effusion,Pleural Other,Fracture,Support Devices\n")


def _chexpert(root: Path) -> Path:
    base = root / "CheXpert-v1.0-small"
    for rel in ("train/patient00001/study1/view1_frontal.jpg", "train/patient00002/study1/view1_frontal.jpg",
                "valid/patient64541/study1/view1_frontal.jpg"):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 30), 128, np.uint8)).save(base / rel)
    write(base / "train.csv", CHEXPERT_HEADER
          + "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,,,1.0,-1.0,,,,,,0.0,,,,1.0\n"
          + "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Male,87,Frontal,PA,1.0,,0.0,,,,,,,,,,,\n")
    write(base / "valid.csv", CHEXPERT_HEADER
          + "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,0.0,1.0,1.0,1.0,0.0,0.0,0.0,0.0,-1.0,0.0,0.0,0.0,0.0,0.0\n")
    return base


@pytest.mark.parametrize("policy, labels, unsure", [
    ("ignore", ("Cardiomegaly", "Support Devices"), ["Lung Opacity"]),
    ("u_ones", ("Cardiomegaly", "Lung Opacity", "Support Devices"), None),
    ("u_zeros", ("Cardiomegaly", "Support Devices"), None)])
def test_chexpert_uncertainty_policies(tmp_path, policy, labels, unsure):
    base = _chexpert(tmp_path)
    raw = get_source("chexpert")(base, on_error="strict", uncertain=policy, val_fraction=0.0)
    m = manifest_from_dict(raw, root=base)
    first, second, valid = m.images
    assert first.file_name == "train/patient00001/study1/view1_frontal.jpg"
    assert (first.width, first.height, first.patient_id, first.split) == (30, 40, "patient00001", "train")
    assert first.labels == labels and first.extra.get("uncertain_labels") == unsure
    assert second.labels == () and valid.split == "test"
    assert set(valid.labels) == {"Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity"} | (
        {"Atelectasis"} if policy == "u_ones" else set())


def test_chexpert_bad_value_and_missing_file(tmp_path):
    base = _chexpert(tmp_path)
    with open(base / "train.csv", "a", encoding="utf-8") as fh:
        fh.write("CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,50,Frontal,PA,,,,,,,,,,,,,,\n")
        fh.write("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Male,87,Frontal,PA,,,2.0,,,,,,,,,,,\n")
    raw = get_source("chexpert")(base, on_error="lenient")
    assert raw["skipped"] == [
        "train.csv:4: image file not found: CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg",
        "train.csv:5: unknown label value(s) [\"Cardiomegaly='2.0'\"]; expected 1.0, 0.0, -1.0 or blank"]


# ---------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG + reports + MS-CXR

META_HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
               "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
               "PatientOrientationCodeSequence_CodeMeaning\n")
MIMIC_LABELS = ("subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
                "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,"
                "Pneumothorax,Support Devices\n")
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  Cough.

 FINDINGS:
 Small left pleural effusion.  No pneumothorax.

 IMPRESSION:
 Small left effusion.
"""


def _mimic(root: Path, ext: str = "jpg") -> None:
    images = [("d1", "10000032", "50414267", "PA"), ("d2", "10000032", "50414267", "LATERAL"),
              ("d3", "10000764", "57375967", "AP"), ("d4", "10000898", "50771383", "PA")]
    for dicom_id, subject, study, view in images:
        path = root / f"files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.{ext}"
        if ext == "jpg":
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((48, 64), 100, np.uint8)).save(path)
        else:
            dicom(path, 64, 48, view, "MONOCHROME1")
    if ext == "jpg":
        write(root / "mimic-cxr-2.0.0-metadata.csv", META_HEADER + "".join(
            f"{d},{s},{st},CHEST (PA AND LAT),{v},48,64,21800506,213014.531,CHEST (PA AND LAT),"
            f"postero-anterior,Erect\n" for d, s, st, v in images))
    write(root / "mimic-cxr-2.0.0-chexpert.csv", MIMIC_LABELS
          + "10000032,50414267,,,,,,,,,,1.0,,,0.0,\n"
          + "10000764,57375967,,,-1.0,,,1.0,,,,,,,,\n"
          + "10000898,50771383,,,,,,,,,1.0,,,,,1.0\n")
    write(root / "mimic-cxr-2.0.0-split.csv", "dicom_id,study_id,subject_id,split\n"
          "d1,50414267,10000032,train\nd2,50414267,10000032,train\nd3,57375967,10000764,validate\n"
          "d4,50771383,10000898,test\n")
    write(root / "mimic-cxr-reports/files/p10/p10000032/s50414267.txt", REPORT)
    write(root / "MS_CXR_Local_Alignment_v1.0.0.csv",
          "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height\n"
          "d1,Pleural Effusion,Small left pleural effusion,files/p10/p10000032/s50414267/d1.jpg,30,20,20,15,64,48\n")


def test_report_sections_keeps_findings_and_impression():
    assert report_sections(REPORT) == "Small left pleural effusion. No pneumothorax.\n\nSmall left effusion."
    assert report_sections("No headers here.\nJust text.") == "No headers here. Just text."


def test_mimic_jpg_all_views(tmp_path):
    _mimic(tmp_path)
    raw = get_source("mimic")(tmp_path, on_error="strict")
    m = manifest_from_dict(raw, root=tmp_path)
    ims = {Path(im.file_name).stem: im for im in m.images}
    d1 = ims["d1"]
    assert d1.file_name == "files/p10/p10000032/s50414267/d1.jpg"
    assert (d1.width, d1.height, d1.split, d1.supervision, d1.patient_id) == (64, 48, "train", "box", "10000032")
    assert d1.labels == ("Pleural Effusion",) and d1.report.startswith("Small left pleural effusion.")
    assert ims["d2"].supervision == "image" and ims["d2"].extra["view_position"] == "LATERAL"
    assert ims["d3"].split == "val" and ims["d3"].labels == ("Fracture",)
    assert ims["d3"].extra["uncertain_labels"] == ["Consolidation"]
    np.testing.assert_allclose(m.boxes_xyxy(d1.id)[0], [[30, 20, 50, 35]])


def test_mimic_ceird_setting(tmp_path):
    _mimic(tmp_path)
    raw = get_source("mimic")(tmp_path, on_error="strict", setting="ceird")
    m = manifest_from_dict(raw, root=tmp_path)
    # d2 is lateral; d3's study is positive for Fracture (outside the 8 MS-CXR classes);
    # d4 ("No Finding" + "Support Devices") stays
    assert [Path(im.file_name).stem for im in m.images] == ["d1", "d4"]
    assert raw["info"]["excluded"] == {"non_frontal": 1, "labels_outside_classes": 1}
    assert raw["info"]["images_without_report"] == 1  # d4 has no report file
    assert len(m.class_names) == 8
    assert [im.supervision for im in m.images] == ["box", "none"]


def test_mimic_dicom_release_reads_headers(tmp_path):
    _mimic(tmp_path, ext="dcm")
    raw = get_source("mimic")(tmp_path, on_error="lenient", image_format="dcm", setting="ceird")
    # the MS-CXR file names d1, so its box is kept; the lateral d2 comes from the DICOM header
    assert raw["skipped"] == []
    m = manifest_from_dict(raw, root=tmp_path)
    assert [Path(im.file_name).name for im in m.images] == ["d1.dcm", "d4.dcm"]
    assert (m.images[0].width, m.images[0].height) == (64, 48)


def test_mimic_bad_ms_cxr_row(tmp_path):
    _mimic(tmp_path)
    with open(tmp_path / "MS_CXR_Local_Alignment_v1.0.0.csv", "a", encoding="utf-8") as fh:
        fh.write("d4,Nodule,nodule,files/x.jpg,1,1,5,5,64,48\n")
    with pytest.raises(ManifestError, match=r"MS_CXR_Local_Alignment_v1.0.0.csv:3: d4: unknown category_name 'Nodule'"):
        get_source("mimic")(tmp_path, on_error="strict")


# ---------------------------------------------------------------------------------------------
# VinDr-CXR

VINDR_HEADER = "image_id,rad_id,class_name,x_min,y_min,x_max,y_max\n"


def _vindr(root: Path, rows: str) -> None:
    dicom(root / "train" / "aaa.dicom", 100, 80)
    dicom(root / "train" / "bbb.dicom", 100, 80)
    write(root / "annotations" / "annotations_train.csv", VINDR_HEADER + rows)
    write(root / "annotations" / "image_labels_train.csv",
          "image_id,rad_ID,Aortic enlargement,Nodule/Mass,Lung tumor,COPD,No finding\n"
          "aaa,R1,1,0,1,0,0\naaa,R2,1,0,1,0,0\naaa,R3,0,0,0,1,0\nbbb,R1,0,0,0,0,1\n")


def test_vindr_fuses_readers(tmp_path):
    _vindr(tmp_path, "aaa,R1,Aortic enlargement,10,10,30,30\n"
                     "aaa,R2,Aortic enlargement,12,10,32,30\n"
                     "aaa,R3,Nodule/Mass,60,40,70,50\n"
                     "bbb,R1,No finding,,,,\n")
    raw = get_source("vindr")(tmp_path, on_error="strict", classes=["Aortic enlargement", "Nodule/Mass", "Lung tumor"])
    m = manifest_from_dict(raw, root=tmp_path)
    a, b = m.images
    assert (a.file_name, a.width, a.height, a.supervision) == ("train/aaa.dicom", 100, 80, "box")
    boxes, labels = m.boxes_xyxy(a.id)
    np.testing.assert_allclose(boxes, [[11, 10, 31, 30], [60, 40, 70, 50]])
    assert [m.class_names[i] for i in labels] == ["Aortic enlargement", "Nodule/Mass"]
    # 2 of 3 readers marked "Lung tumor" in image_labels -> an image-level label without a box
    assert set(a.labels) == {"Aortic enlargement", "Nodule/Mass", "Lung tumor"}
    assert b.labels == () and m.boxes_xyxy(b.id)[0].shape == (0, 4)
    union = get_source("vindr")(tmp_path, on_error="strict", fusion="union")
    assert len(union["annotations"]) == 3


def test_vindr_bad_rows(tmp_path):
    _vindr(tmp_path, "aaa,R1,Aortic enlargement,10,10,5,30\n"
                     "bbb,R1,No finding,1,2,3,4\n"
                     "ccc,R1,No finding,,,,\n")
    with pytest.raises(ManifestError) as err:
        get_source("vindr")(tmp_path, on_error="strict")
    msg = str(err.value)
    assert "annotations_train.csv:2: aaa: box has non-positive size" in msg
    assert "annotations_train.csv:3: bbb: 'No finding' row with box coordinates" in msg
    assert "ccc: image file not found" in msg


# ---------------------------------------------------------------------------------------------
# RSNA Pneumonia


def test_rsna_boxes_and_bad_rows(tmp_path):
    for pid in ("0004cfab", "00313ee0", "00436515"):
        dicom(tmp_path / "stage_2_train_images" / f"{pid}.dcm", 128, 128)
    write(tmp_path / "stage_2_train_labels.csv", "patientId,x,y,width,height,Target\n"
          "0004cfab,,,,,0\n"
          "00313ee0,26.0,15.0,21.0,44.0,1\n"
          "00313ee0,80.0,20.0,16.0,40.0,1\n"
          "00436515,120.0,20.0,16.0,40.0,1\n"
          "ffffffff,,,,,0\n")
    write(tmp_path / "stage_2_detailed_class_info.csv", "patientId,class\n0004cfab,No Lung Opacity / Not Normal\n"
          "00313ee0,Lung Opacity\n00436515,Lung Opacity\n")
    with pytest.raises(ManifestError) as err:
        get_source("rsna")(tmp_path, on_error="strict")
    msg = str(err.value)
    assert "stage_2_train_labels.csv:5: 00436515: box [x=120" in msg
    assert "stage_2_train_labels.csv:6: image file not found: stage_2_train_images/ffffffff.dcm" in msg
    raw = get_source("rsna")(tmp_path, on_error="lenient")
    m = manifest_from_dict(raw, root=tmp_path)
    neg, pos = m.images
    assert neg.labels == () and neg.extra["detailed_class"] == "No Lung Opacity / Not Normal"
    assert pos.labels == ("Lung Opacity",) and (pos.width, pos.height) == (128, 128)
    np.testing.assert_allclose(m.boxes_xyxy(pos.id)[0], [[26, 15, 47, 59], [80, 20, 96, 60]])


def test_fatal_when_label_file_missing(tmp_path):
    for name in ("nih", "rsna", "chexpert", "vindr"):
        with pytest.raises(ManifestError, match=name):
            get_source(name)(tmp_path, on_error="lenient")
