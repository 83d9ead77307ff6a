"""Bad-input catalogue (issue #12): each kind of bad input gives an error naming the record and the
problem, and in lenient mode the record is skipped *and listed* (nothing dropped silently).

docs/reliability.md has the table that maps every catalogue entry to its test.
"""

from __future__ import annotations

import copy
import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxrdistill.config import load_config, validate_config
from cxrdistill.data.io import read_image, read_image_size
from cxrdistill.data.manifest import MAX_REPORT_CHARS, load_manifest, manifest_from_dict
from cxrdistill.data.sources import get_source
from cxrdistill.data.study import StudyData
from cxrdistill.errors import (
    ConfigError,
    ImageReadError,
    ManifestError,
)

#: Identifiers written into every test DICOM; no message, log or output may contain them.
PATIENT_NAME = "Zzyzx^Quintessa"
PATIENT_ID = "MRN-31415926"
PATIENT_BIRTH_DATE = "19410723"
IDENTIFIERS = ("Zzyzx", "Quintessa", PATIENT_ID, PATIENT_BIRTH_DATE)


# ---------------------------------------------------------------------------------------------
# builders of (bad) files


def ramp(height: int = 40, width: int = 48, high: int = 255) -> np.ndarray:
    """An integer ramp with distinct rows and columns (uint8 for high <= 255, else uint16)."""
    y, x = np.mgrid[0:height, 0:width]
    values = (x + 2 * y) * high // (width - 1 + 2 * (height - 1))
    return values.astype(np.uint8 if high <= 255 else np.uint16)


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def write_png(path: Path, pixels: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(ramp() if pixels is None else pixels))
    return path


def fake_png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` 8-bit grey pixels, with one tiny IDAT chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) \
        + chunk(b"IEND", b"")


def write_dicom(path: Path, pixels: np.ndarray | None = None, *, rows: int | None = None,
                columns: int | None = None) -> Path:
    """A single-frame MONOCHROME2 DICOM carrying patient identifiers (pixels None: no PixelData)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.OtherPatientIDs = "ALT-27182818"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = (8, 8) if pixels is None else pixels.shape
    if rows is not None:
        ds.Rows, ds.Columns = rows, columns
    if pixels is not None:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return path


def reason_of(path: Path, **kwargs) -> str:
    """The reason `read_image` refuses `path`; asserts the error names the file."""
    with pytest.raises(ImageReadError) as info:
        read_image(path, **kwargs)
    assert info.value.path == str(path) and str(path) in str(info.value)
    return info.value.reason


# ---------------------------------------------------------------------------------------------
# images (catalogue: truncated PNG/JPEG, zero bytes, DICOM without pixels, unsupported transfer
# syntax, non-image with an image extension, constant 16-bit PNG, RGB/RGBA, huge, NaN/inf)
# Further cases are in tests/test_io.py (named in docs/reliability.md).


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg")])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.95])
def test_truncated_png_and_jpeg_are_refused_by_name(tmp_path, fmt, suffix, keep):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    data = png_bytes(noise, fmt)
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: int(len(data) * keep)])
    assert "truncated or corrupt" in reason_of(path)


def test_zero_byte_files_of_every_kind(tmp_path):
    for name in ("a.png", "a.jpg", "a.dcm", "a.tiff"):
        (tmp_path / name).write_bytes(b"")
        assert reason_of(tmp_path / name) == "file is empty (0 bytes)"
        with pytest.raises(ImageReadError, match="0 bytes"):
            read_image_size(tmp_path / name)


@pytest.mark.parametrize("name, content, phrase", [
    ("report.png", b"Findings: clear lungs.\n" * 10, "not a recognised image"),
    ("table.jpg", b"id,label\n1,nodule\n" * 10, "not a recognised image"),
    ("page.png", b"<html><body>404 Not Found</body></html>", "not a recognised image"),
    ("notes.dcm", b"plain text, not DICOM " * 20, "not a DICOM file"),
    ("archive.png", b"PK\x03\x04" + bytes(200), "not a recognised image"),
])
def test_non_image_file_with_an_image_extension(tmp_path, name, content, phrase):
    (tmp_path / name).write_bytes(content)
    assert phrase in reason_of(tmp_path / name)


def test_dicom_without_pixel_data_and_unsupported_transfer_syntax(tmp_path):
    assert "no PixelData element" in reason_of(write_dicom(tmp_path / "sr.dcm", None))
    import pydicom
    from pydicom.encaps import encapsulate

    path = write_dicom(tmp_path / "video.dcm", ramp(high=4095))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(path)
    reason = reason_of(path)
    assert "unsupported transfer syntax" in reason and "1.2.840.10008.1.2.4.102" in reason


def test_constant_16_bit_png_is_refused_not_divided_by_zero(tmp_path):
    path = write_png(tmp_path / "flat16.png", np.full((32, 32), 40000, np.uint16))
    assert Image.open(path).mode.startswith("I")
    assert reason_of(path) == "all pixels equal (40000): no image content"


def test_rgb_and_rgba_radiographs_load_as_the_grey_value(tmp_path):
    grey = ramp()
    expected = read_image(write_png(tmp_path / "grey.png", grey))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full_like(grey, 77)[..., None]], axis=2)  # alpha is ignored
    for name, pixels in (("rgb.png", rgb), ("rgba.png", rgba)):
        out = read_image(write_png(tmp_path / name, pixels))
        assert out.shape == grey.shape
        np.testing.assert_allclose(out, expected, atol=1 / 255)


def test_huge_image_is_refused_from_its_header_without_allocating(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(fake_png_header(8000, 8000))  # 91 bytes claiming 64 megapixels
    assert read_image_size(path) == (8000, 8000)
    start = time.perf_counter()
    reason = reason_of(path)
    assert "8000x8000 = 64000000 pixels, above max_pixels=50000000" in reason
    assert time.perf_counter() - start < 1.0  # refused from the header: nothing was decoded
    dcm = write_dicom(tmp_path / "huge.dcm", ramp(4, 4, 4095), rows=8000, columns=8000)
    assert "above max_pixels" in reason_of(dcm)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_in_a_32_bit_float_image(tmp_path, bad):
    pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    pixels[2, 3] = bad
    path = tmp_path / "float.tiff"
    Image.fromarray(pixels, mode="F").save(path)
    assert reason_of(path) == "1 NaN/inf pixel value(s)"


def test_damaged_dicom_header_elements_are_named_without_identifiers(tmp_path):
    """Found by fuzzing: pydicom parses elements lazily, so damage surfaced as raw pydicom errors
    (some quoting header bytes, patient name included). Now an ImageReadError naming the file."""
    path = write_dicom(tmp_path / "ok.dcm", ramp(high=4095))
    data = bytearray(path.read_bytes())
    where = data.index(b"\x28\x00\x10\x00")  # (0028,0010) Rows: break its VR
    data[where + 4: where + 6] = b"\x55\x08"
    bad = tmp_path / "bad_vr.dcm"
    bad.write_bytes(bytes(data))
    for call in (read_image, read_image_size):
        with pytest.raises(ImageReadError) as info:
            call(bad)
        assert info.value.path == str(bad) and "corrupt DICOM" in info.value.reason
        assert not any(i in str(info.value) for i in IDENTIFIERS)


# ---------------------------------------------------------------------------------------------
# manifest records (catalogue: boxes, categories, duplicate ids, reports, escaping file names)


def good_raw(root: Path) -> dict:
    for name in ("a.png", "b.png", "c.png"):
        write_png(root / name)
    return {
        "categories": [{"id": 1, "name": "nodule"}, {"id": 2, "name": "effusion"}],
        "images": [
            {"id": 1, "file_name": "a.png", "width": 48, "height": 40, "labels": ["nodule"],
             "report": "Small nodule.", "patient_id": "p1"},
            {"id": 2, "file_name": "b.png", "width": 48, "height": 40, "supervision": "image",
             "labels": ["effusion"], "patient_id": "p2"},
            {"id": 3, "file_name": "c.png", "width": 48, "height": 40, "split": "test", "patient_id": "p3"},
        ],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 8]},
                        {"id": 11, "image_id": 3, "category_id": 2, "bbox": [20, 10, 10, 10]}],
    }


def _set(path: tuple, value):
    def apply(raw: dict) -> None:
        node = raw
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return apply


# (id, damage, record named, phrase of the problem, action)
RECORD_CASES = [
    ("box_negative_size", _set(("annotations", 0, "bbox"), [5, 5, -3, 8]), "annotation 10 (image 1)",
     "non-positive size (w=-3, h=8)", "skipped"),
    ("box_zero_size", _set(("annotations", 0, "bbox"), [5, 5, 10, 0]), "annotation 10 (image 1)",
     "non-positive size", "skipped"),
    ("box_outside", _set(("annotations", 0, "bbox"), [40, 5, 30, 8]), "annotation 10 (image 1)",
     "lies outside the 48 x 40 image", "skipped"),
    ("box_far_negative", _set(("annotations", 0, "bbox"), [-20, 5, 10, 8]), "annotation 10 (image 1)",
     "lies outside", "skipped"),
    ("box_nan", _set(("annotations", 0, "bbox"), [5, float("nan"), 10, 8]), "annotation 10 (image 1)",
     "NaN or infinite", "skipped"),
    ("box_inf", _set(("annotations", 0, "bbox"), [5, 5, float("inf"), 8]), "annotation 10 (image 1)",
     "NaN or infinite", "skipped"),
    ("box_huge_int", _set(("annotations", 0, "bbox"), [5, 5, 2 ** 1100, 8]), "annotation 10 (image 1)",
     "NaN or infinite", "skipped"),
    ("box_three_numbers", _set(("annotations", 0, "bbox"), [5, 5, 10]), "annotation 10 (image 1)",
     "bbox must be 4 numbers", "skipped"),
    ("box_text", _set(("annotations", 0, "bbox"), ["5", 5, 10, 8]), "annotation 10 (image 1)",
     "bbox must be 4 numbers", "skipped"),
    ("unknown_category_id", _set(("annotations", 0, "category_id"), 7), "annotation 10 (image 1)",
     "unknown category_id 7; known: [1, 2]", "skipped"),
    ("category_id_a_list", _set(("annotations", 0, "category_id"), [1]), "annotation 10 (image 1)",
     "must be integers", "skipped"),
    ("image_id_a_list", _set(("annotations", 0, "image_id"), [1]), "annotation 10 (image [1])",
     "must be integers", "skipped"),
    ("annotation_of_unknown_image", _set(("annotations", 0, "image_id"), 99), "annotation 10 (image 99)",
     "not in the manifest", "skipped"),
    ("unknown_category_name", _set(("images", 1, "labels"), ["efusion"]), "image 2 (b.png)",
     "unknown class name(s) in labels: ['efusion']; known: ['effusion', 'nodule']", "skipped"),
    ("duplicate_image_id", _set(("images", 2, "id"), 2), "image 2 (c.png)", "duplicate image id", "skipped"),
    ("duplicate_category_id", _set(("categories", 1, "id"), 1), "category 1", "duplicate category id",
     "skipped"),
    ("duplicate_category_name", _set(("categories", 1, "name"), "nodule"), "category 2",
     "duplicate category name 'nodule'", "skipped"),
    ("missing_width", lambda r: r["images"][1].pop("width"), "image 2 (b.png)",
     "missing required key(s) ['width']", "skipped"),
    ("negative_height", _set(("images", 1, "height"), -40), "image 2 (b.png)",
     "width/height must be positive integers", "skipped"),
    ("empty_report", _set(("images", 0, "report"), " \n "), "image 1 (a.png)", "empty report",
     "report treated as missing"),
    ("report_1mb", _set(("images", 0, "report"), "Nodule. " * 131072), "image 1 (a.png)",
     "report is 1,048,576 characters long, above MAX_REPORT_CHARS", "report treated as missing"),
    ("report_lone_surrogate", _set(("images", 0, "report"), "Small \udcff nodule"), "image 1 (a.png)",
     "not valid Unicode text (lone surrogate at character 6)", "report treated as missing"),
    ("report_not_text", _set(("images", 0, "report"), {"text": "x"}), "image 1 (a.png)",
     "'report' must be text, got dict", "skipped"),
    ("escape_root", _set(("images", 1, "file_name"), "../../etc/passwd"), "image 2 (../../etc/passwd)",
     "escapes the data root", "skipped"),
    ("escape_root_inside_name", _set(("images", 1, "file_name"), "sub/../../../etc/passwd"),
     "image 2 (sub/../../../etc/passwd)", "escapes the data root", "skipped"),
    ("absolute_path", _set(("images", 1, "file_name"), "/etc/passwd"), "image 2 (/etc/passwd)",
     "absolute file_name refused", "skipped"),
    ("nul_in_file_name", _set(("images", 1, "file_name"), "b\x00.png"), "image 2 (b\x00.png)",
     "NUL character", "skipped"),
    ("file_name_too_long", _set(("images", 1, "file_name"), "x" * 5000 + ".png"), "image 2 (xxx",
     "cannot be used as a path (File name too long)", "skipped"),
    ("missing_image_file", _set(("images", 1, "file_name"), "gone.png"), "image 2 (gone.png)",
     "image file not found", "skipped"),
]


@pytest.mark.parametrize("case", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_bad_record_is_named_strict_and_listed_lenient(tmp_path, case):
    _, damage, record, phrase, action = case
    raw = good_raw(tmp_path)
    damage(raw)
    if action == "skipped":
        with pytest.raises(ManifestError) as err:
            manifest_from_dict(copy.deepcopy(raw), root=tmp_path, on_error="strict")
        assert f"{record}" in str(err.value) and phrase in str(err.value)
    manifest = manifest_from_dict(raw, root=tmp_path, on_error="lenient")
    issues = [i for i in manifest.skipped if i.record.startswith(record) and phrase in i.problem]
    assert len(issues) == 1 and issues[0].action == action, [str(i) for i in manifest.skipped]
    # nothing silently dropped: every input image / annotation is kept or named in an issue
    named = " | ".join(str(i) for i in manifest.skipped)
    kept_images = {im.id for im in manifest.images}
    for pos, row in enumerate(raw["images"]):
        if row.get("id") not in kept_images or pos > 0 and row.get("id") == raw["images"][pos - 1].get("id"):
            assert f"image {row.get('id')}" in named or f"image #{pos}" in named
    kept_annotations = {a.id for a in manifest.annotations}
    for row in raw["annotations"]:
        if row["id"] not in kept_annotations:
            assert f"annotation {row['id']}" in named


def test_report_limit_is_generous_for_real_reports():
    assert MAX_REPORT_CHARS >= 50_000  # the longest MIMIC-CXR reports are a few thousand characters


def test_file_names_outside_the_root_are_allowed_only_when_asked(tmp_path):
    outside = write_png(tmp_path / "elsewhere" / "x.png")
    other = write_png(tmp_path / "elsewhere" / "y.png")  # one file may back one record only (issue #21)
    root = tmp_path / "data"
    raw = good_raw(root)
    raw["images"][1]["file_name"] = "../elsewhere/x.png"
    raw["images"][2]["file_name"] = str(other)
    lenient = manifest_from_dict(copy.deepcopy(raw), root=root, on_error="lenient")
    assert [im.id for im in lenient.images] == [1] and len(lenient.skipped) == 3  # 2 images + box 11
    allowed = manifest_from_dict(raw, root=root, allow_outside_root=True)
    assert allowed.image_path(2) == outside.resolve() and allowed.image_path(3) == other


def test_manifest_file_not_json_not_utf8_or_missing_keys(tmp_path):
    cases = [
        (b"{\"images\": [", "not valid JSON (line 1, column 13"),
        (b"", "not valid JSON (line 1, column 1"),
        (b"\xff\xfe{}", "not UTF-8 text"),
        (json.dumps({"images": []}).encode(), "missing required key(s) ['categories']"),
        (json.dumps([1, 2]).encode(), "top level must be a JSON object"),
        (json.dumps({"categories": {}, "images": []}).encode(), "'categories' must be a list"),
        (json.dumps({"categories": [], "images": []}).encode(), "no valid categories"),
    ]
    for n, (content, phrase) in enumerate(cases):
        path = tmp_path / f"m{n}.json"
        path.write_bytes(content)
        with pytest.raises(ManifestError) as err:
            load_manifest(path)
        assert str(err.value).startswith(str(path)) and phrase in str(err.value)


def test_image_size_in_manifest_differs_from_file(tmp_path):
    raw = good_raw(tmp_path)
    raw["images"][2]["width"] = 64
    with pytest.raises(ManifestError, match=r"image 3 \(c.png\): width x height in the manifest \(64 x 40\) "
                                            r"differ from the file \(48 x 40\)"):
        manifest_from_dict(raw, root=tmp_path, check_images=True)


# ---------------------------------------------------------------------------------------------
# CSV sources (catalogue: missing column)


def test_csv_with_a_missing_column_names_file_line_and_columns(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("image,finding\na.png,nodule\n", encoding="utf-8")
    with pytest.raises(ManifestError) as err:
        get_source("csv")(tmp_path, labels_col="labels", report_col="report")
    text = str(err.value)
    assert "labels.csv:1: missing column(s) ['labels', 'report']" in text and "['image', 'finding']" in text


def test_csv_empty_file_is_named(tmp_path):
    (tmp_path / "labels.csv").write_text("", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"labels.csv: empty file \(no header line\)"):
        get_source("csv")(tmp_path)


def test_csv_report_that_is_not_utf8_is_named_by_line(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_bytes(b"image,report\na.png,fine\na.png,caf\xe9 au lait\n")
    with pytest.raises(ManifestError, match=r"labels.csv:3"):
        get_source("csv")(tmp_path, report_col="report", on_error="lenient")


# ---------------------------------------------------------------------------------------------
# run configs (catalogue: unknown key with the nearest suggestion, wrong type)


CONFIG = "train: {max_steps: 5}\nmethod: {name: x}\n"


@pytest.mark.parametrize("override, phrase", [
    ("train.learning_rate=0.1", "train.learning_rate: unknown key; did you mean 'lr'?"),
    ("data.imagesize=64", "data.imagesize: unknown key; did you mean 'image_size'?"),
    ("trian.lr=0.1", "trian: unknown key; did you mean 'train'?"),
    ("train.lr=fast", "train.lr: expected float, got 'fast' (str)"),
    ("train.max_steps=[1, 2]", "train.max_steps: expected int, got [1, 2] (list)"),
    ("data.image_size=true", "data.image_size: expected int, got True (bool)"),
    ("train.grad_clip=false", "train.grad_clip: expected float or None, got False (bool)"),
    ("data.on_error=ignore", "data.on_error: expected one of 'strict', 'lenient', got 'ignore'"),
    ("train.lr=-1", "train.lr: expected float, got -1 (int): Input should be greater than 0"),
])
def test_config_unknown_key_and_wrong_type(tmp_path, override, phrase):
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert phrase in str(err.value) and str(path) in str(err.value)


def test_config_non_string_top_level_key_is_named():
    with pytest.raises(ConfigError, match=r"\n  5: .*Keys should be strings"):
        validate_config({"method": {"name": "x"}, 5: 1})


# ---------------------------------------------------------------------------------------------
# end to end: manifest -> cache -> dataset in lenient mode drops the bad images and lists each


def test_lenient_study_data_leaves_out_bad_images_and_lists_each(tmp_path):
    root = tmp_path / "data"
    good = [write_png(root / f"good{i}.png", np.roll(ramp(), i, axis=1)) for i in range(3)]
    bad_files = {
        "truncated.png": png_bytes(np.random.default_rng(1).integers(0, 255, (40, 48), dtype=np.uint8))[:300],
        "empty.jpg": b"",
        "text.png": b"this is not an image" * 5,
        "flat16.png": png_bytes(np.full((40, 48), 1234, np.uint16)),
    }
    for name, data in bad_files.items():
        (root / name).write_bytes(data)
    write_dicom(root / "nopixels.dcm", None, rows=40, columns=48)
    names = [p.name for p in good] + list(bad_files) + ["nopixels.dcm"]
    raw = {"categories": [{"id": 1, "name": "nodule"}],
           "images": [{"id": i + 1, "file_name": n, "width": 48, "height": 40} for i, n in enumerate(names)],
           "annotations": [{"id": 100 + i, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 10, 10]}
                           for i in range(len(names))]}
    raw["images"].append({"id": 99, "file_name": "missing.png", "width": 48, "height": 40})
    (root / "manifest.json").write_text(json.dumps(raw))

    # strict: a missing file stops at the manifest, an undecodable one at the cache, each by name
    with pytest.raises(ManifestError, match=r"image 99 \(missing.png\): image file not found"):
        StudyData.open(root / "manifest.json", image_size=32, cache_dir=tmp_path / "cache_strict")
    strict_raw = {**raw, "images": raw["images"][:-1]}
    (root / "strict.json").write_text(json.dumps(strict_raw))
    with pytest.raises(ImageReadError) as err:
        StudyData.open(root / "strict.json", image_size=32, cache_dir=tmp_path / "cache_strict")
    assert err.value.path == str((root / "truncated.png").resolve())
    assert not list((tmp_path / "cache_strict").glob("index_*.json"))  # no half-built cache committed

    data = StudyData.open(root / "manifest.json", image_size=32, cache_dir=tmp_path / "cache",
                          on_error="lenient")
    dataset = data.dataset("train")
    assert sorted(s["image_id"] for s in dataset) == [1, 2, 3]
    assert all(s["image"].shape == (1, 32, 32) for s in dataset)
    skipped = {issue.record: issue.problem for issue in data.manifest.skipped}
    expected = {
        "image 4 (truncated.png)": "truncated or corrupt",
        "image 5 (empty.jpg)": "empty (0 bytes)",
        "image 6 (text.png)": "not a recognised image",
        "image 7 (flat16.png)": "all pixels equal",
        "image 8 (nopixels.dcm)": "no PixelData",
        "image 99 (missing.png)": "image file not found",
    }
    for record, phrase in expected.items():
        assert record in skipped and phrase in skipped[record], skipped
    # every manifest image is either in the dataset or listed
    assert len(dataset) + len(expected) == len(raw["images"])
    assert not any(i in " ".join(skipped.values()) for i in IDENTIFIERS)
