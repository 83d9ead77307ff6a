"""Decoding PNG/JPEG/TIFF/DICOM into float32 (H, W) in [0, 1], and the errors on bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxrdistill.data.io import read_image, read_image_size
from cxrdistill.errors import ImageReadError

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "MRN-998877"


def _ramp(h: int = 40, w: int = 48, high: int = 4095) -> np.ndarray:
    """Integer ramp with distinct rows and columns so orientation errors show."""
    y, x = np.mgrid[0:h, 0:w]
    return ((x + 2 * y) * high // (w - 1 + 2 * (h - 1))).astype(np.uint16)


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    preamble: bool = True,
) -> Path:
    """Write a minimal single-frame DICOM with patient identifiers (pixels None: no PixelData)."""
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
    ds.PatientBirthDate = "19700101"
    ds.Modality = "DX"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    else:
        ds.Rows, ds.Columns = 8, 8
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    ds.save_as(path, enforce_file_format=preamble, implicit_vr=False, little_endian=True)
    return path


# --- PNG / JPEG / TIFF -------------------------------------------------------------------------


def test_png_8_bit_is_divided_by_255(tmp_path: Path) -> None:
    pixels = (_ramp(high=255)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.float32 and out.shape == (40, 48)
    np.testing.assert_allclose(out, pixels / 255.0, atol=1e-6)


def test_png_16_bit_keeps_full_precision(tmp_path: Path) -> None:
    pixels = _ramp(high=65535)
    pixels[0, :3] = [0, 1, 2]  # steps far below 8-bit resolution (1/255)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(out, pixels / 65535.0, atol=1e-7)
    assert out[0, 1] == pytest.approx(1 / 65535) and out[0, 2] == pytest.approx(2 / 65535)


def test_jpeg_grayscale(tmp_path: Path) -> None:
    pixels = (_ramp(high=255)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert np.abs(out - pixels / 255.0).max() < 0.05  # lossy


def test_rgb_and_rgba_become_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    rgb[0, 0] = 0
    Image.fromarray(rgb).save(tmp_path / "c.png")
    rgba = np.concatenate([rgb, np.full((8, 10, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "c4.png")
    expected = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255.0
    for name in ("c.png", "c4.png"):
        out = read_image(tmp_path / name)
        assert out.shape == (8, 10)
        assert out[3, 3] == pytest.approx(expected, abs=1e-6)
        assert out[0, 0] == 0.0


def test_read_image_size_reads_header(tmp_path: Path) -> None:
    Image.fromarray(_ramp(33, 57)).save(tmp_path / "a.png")
    assert read_image_size(tmp_path / "a.png") == (33, 57)
    path = write_dicom(tmp_path / "a.dcm", _ramp(21, 19))
    assert read_image_size(path) == (21, 19)


# --- DICOM ---------------------------------------------------------------------------------------


def test_dicom_min_max_scaled(tmp_path: Path) -> None:
    pixels = _ramp()
    out = read_image(write_dicom(tmp_path / "a.dcm", pixels))
    np.testing.assert_allclose(out, (pixels - pixels.min()) / np.ptp(pixels), atol=1e-6)


def test_dicom_detected_by_magic_without_extension(tmp_path: Path) -> None:
    pixels = _ramp()
    path = write_dicom(tmp_path / "image_without_suffix", pixels)
    assert read_image(path).shape == pixels.shape


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    pixels = _ramp()
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", pixels))
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono1[0, 0] == 1.0 and mono1[-1, -1] == 0.0


def test_negative_rescale_slope_flips_order(tmp_path: Path) -> None:
    pixels = _ramp()
    out = read_image(write_dicom(tmp_path / "s.dcm", pixels, slope=-2.0, intercept=100.0))
    assert out[0, 0] == 1.0 and out[-1, -1] == 0.0


def test_window_clips_outside_range(tmp_path: Path) -> None:
    pixels = _ramp(high=4095)
    out = read_image(write_dicom(tmp_path / "w.dcm", pixels, window=(2048.0, 1024.0)))
    low, high = pixels <= 1536 - 1, pixels >= 2560
    assert low.any() and high.any()
    assert np.all(out[low] == 0.0) and np.all(out[high] == 1.0)
    middle = (pixels > 1700) & (pixels < 2400)
    assert np.all((out[middle] > 0.0) & (out[middle] < 1.0))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_dicom_decodes_losslessly(tmp_path: Path, syntax: str) -> None:
    pixels = _ramp()
    plain = read_image(write_dicom(tmp_path / "p.dcm", pixels))
    out = read_image(write_dicom(tmp_path / "c.dcm", pixels, transfer_syntax=syntax))
    np.testing.assert_allclose(out, plain, atol=1e-6)


# --- errors --------------------------------------------------------------------------------------


def _reason(path: Path, **kwargs) -> str:
    with pytest.raises(ImageReadError) as info:
        read_image(path, **kwargs)
    assert info.value.path == str(path)
    return info.value.reason


def test_missing_and_empty_files(tmp_path: Path) -> None:
    assert "not found" in _reason(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty (0 bytes)" in _reason(tmp_path / "empty.png")


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("hello, this is text")
    assert "not a recognised image" in _reason(tmp_path / "notes.png")
    (tmp_path / "notes.dcm").write_text("hello, this is text" * 20)
    assert "not a DICOM file" in _reason(tmp_path / "notes.dcm")


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_files(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / f"a.{suffix}")
    data = (tmp_path / f"a.{suffix}").read_bytes()
    (tmp_path / f"t.{suffix}").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _reason(tmp_path / f"t.{suffix}")


def test_constant_image(tmp_path: Path) -> None:
    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(tmp_path / "flat.png")
    assert _reason(tmp_path / "flat.png").startswith("all pixels equal")


def test_nan_pixels(tmp_path: Path) -> None:
    pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    pixels[2, 3] = np.nan
    Image.fromarray(pixels, mode="F").save(tmp_path / "nan.tiff")
    assert "NaN/inf" in _reason(tmp_path / "nan.tiff")


def test_too_many_pixels(tmp_path: Path) -> None:
    Image.fromarray(_ramp(40, 48)).save(tmp_path / "a.png")
    reason = _reason(tmp_path / "a.png", max_pixels=1000)
    assert "40x48 = 1920 pixels" in reason and "max_pixels=1000" in reason
    path = write_dicom(tmp_path / "a.dcm", _ramp(40, 48))
    assert "max_pixels=1000" in _reason(path, max_pixels=1000)


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "sr.dcm", None)
    assert "no PixelData" in _reason(path)


def test_unsupported_transfer_syntax_is_named(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "v.dcm", _ramp())
    import pydicom

    ds = pydicom.dcmread(path)
    from pydicom.encaps import encapsulate

    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(path)
    reason = _reason(path)
    assert "unsupported transfer syntax" in reason and "MPEG2" in reason


def test_errors_never_contain_patient_identifiers(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "bad.dcm", _ramp())
    import pydicom

    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:100]  # too short for Rows x Columns
    ds.save_as(path)
    reasons = [_reason(path)]
    flat = write_dicom(tmp_path / "flat.dcm", np.full((8, 8), 5, np.uint16))
    reasons.append(_reason(flat))
    reasons.append(_reason(write_dicom(tmp_path / "none.dcm", None)))
    for reason in reasons:
        assert PATIENT_NAME.split("^")[0] not in reason and PATIENT_ID not in reason
        assert "19700101" not in reason
    assert "cannot decode DICOM pixel data" in reasons[0]
