"""Decode one radiograph file (PNG, JPEG, other Pillow formats, DICOM) into a float image.

Every reader returns ``float32 (H, W)`` in ``[0, 1]``, one channel:

- **PNG/JPEG/TIFF** (Pillow): integer pixels are divided by the maximum of their bit depth
  (255 for 8-bit, 65535 for 16-bit ``I;16`` / ``I`` PNGs), so the stored display intensities are
  kept as they are; float images (mode ``F``) are min-max scaled.
- **Colour** images (RGB, RGBA, palette, CMYK, YCbCr) are converted to luminance with the ITU-R
  BT.601 weights ``0.299 R + 0.587 G + 0.114 B`` (what Pillow's ``convert("L")`` uses); any alpha
  channel is ignored. Radiographs saved as colour files carry the same value in every channel, so
  this returns that value.
- **DICOM** (pydicom, pylibjpeg handlers for compressed transfer syntaxes): modality LUT
  (RescaleSlope / RescaleIntercept) then VOI LUT or WindowCenter / WindowWidth are applied, the
  result is min-max scaled to ``[0, 1]``, and MONOCHROME1 images are inverted so that bone is
  bright. A file is DICOM when it has ``DICM`` at byte 128 or a ``.dcm`` / ``.dicom`` extension.

Every failure raises :class:`cxrdistill.errors.ImageReadError` with the path and a specific
reason. DICOM patient identifiers are never put into a message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxrdistill.errors import ImageReadError

#: Largest image accepted, in pixels (H * W). 50 megapixels is well above any chest radiograph
#: (a 43 x 43 cm detector at 0.1 mm pitch is about 18.5 MP) and stops decompression bombs early.
DEFAULT_MAX_PIXELS = 50_000_000
#: Decode budget in bytes: the working memory a decode needs (raw samples + float64 + float32 copies,
#: estimated from the header before any pixel is decoded). 1 GiB admits a 16-bit 50 MP radiograph.
DEFAULT_MAX_DECODE_BYTES = 1 << 30
#: Largest ratio of raw pixel bytes to file bytes. Radiographs compress 2-20x (PNG, JPEG); a 47 KB
#: 7000x7000 PNG (ratio ~1000) is a decompression bomb and is refused before its decode.
DEFAULT_MAX_COMPRESSION_RATIO = 250.0
#: Environment variables that override the two budgets (CLI users: no code change needed).
ENV_MAX_DECODE_BYTES = "CXRDISTILL_MAX_DECODE_BYTES"
ENV_MAX_COMPRESSION_RATIO = "CXRDISTILL_MAX_COMPRESSION_RATIO"
_WORKING_BYTES_PER_PIXEL = 8 + 4  # float64 working copy + float32 result

_DICOM_SUFFIXES = {".dcm", ".dicom"}
_DICOM_MAGIC_OFFSET = 128
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)
#: DICOM elements that identify a patient; their values are scrubbed from every message.
_IDENTIFYING_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs")


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` into ``float32 (H, W)`` in ``[0, 1]``.

    Raises ImageReadError for a missing, empty, truncated, non-image or constant file, a DICOM
    without pixels or with an unsupported transfer syntax, NaN/inf pixels, or more than
    ``max_pixels`` pixels.
    """
    path = Path(path)
    with _os_errors_named(path):
        _check_file(path)
        if _is_dicom(path):
            return _read_dicom(path, max_pixels)
        return _read_pillow(path, max_pixels)


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of the image in ``path``, read from the header without decoding pixels."""
    path = Path(path)
    with _os_errors_named(path):
        return _read_size(path)


def _read_size(path: Path) -> tuple[int, int]:
    _check_file(path)
    if _is_dicom(path):
        ds = _dcmread(path, stop_before_pixels=True)
        with _corrupt_dicom_guard(path, "header"):
            rows, cols = ds.get("Rows"), ds.get("Columns")
            if rows is None or cols is None:
                raise ImageReadError(path, "DICOM header has no Rows/Columns (not an image)")
            return int(rows), int(cols)
    with _open_pillow(path) as image:
        width, height = image.size
    return height, width


# ---------------------------------------------------------------------------------------------
# shared checks


@contextmanager
def _os_errors_named(path: Path) -> Iterator[None]:
    """An OSError while reading ``path`` (permission denied, I/O error) becomes an ImageReadError."""
    try:
        yield
    except OSError as exc:
        raise ImageReadError(path, f"cannot read the file ({exc.strerror or exc})") from None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")


def _check_pixel_count(path: Path, height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise ImageReadError(
            path,
            f"image is {height}x{width} = {height * width} pixels, above max_pixels={max_pixels}",
        )


def _budget(env: str, default: float) -> float:
    text = os.environ.get(env)
    if text is None or not text.strip():
        return default
    try:
        return float(text)
    except ValueError:
        raise ImageReadError(Path(env), f"environment variable {env}={text!r} is not a number") from None


def check_decode_budget(path: Path, height: int, width: int, sample_bytes: int, *,
                        max_bytes: float | None = None, max_ratio: float | None = None) -> None:
    """Refuse, from the header alone, a decode above the byte budget or a suspicious compression ratio.

    ``sample_bytes``: raw bytes per pixel of the stored image (all channels). Budgets default to
    ``CXRDISTILL_MAX_DECODE_BYTES`` / ``CXRDISTILL_MAX_COMPRESSION_RATIO`` or the module defaults.
    """
    max_bytes = _budget(ENV_MAX_DECODE_BYTES, DEFAULT_MAX_DECODE_BYTES) if max_bytes is None else max_bytes
    max_ratio = _budget(ENV_MAX_COMPRESSION_RATIO, DEFAULT_MAX_COMPRESSION_RATIO) if max_ratio is None else max_ratio
    raw = height * width * sample_bytes
    needed = raw + height * width * _WORKING_BYTES_PER_PIXEL
    if needed > max_bytes:
        raise ImageReadError(path, f"decode budget: {height}x{width} needs about {needed / 2**20:.0f} MiB, "
                                   f"above {max_bytes / 2**20:.0f} MiB ({ENV_MAX_DECODE_BYTES})")
    size = path.stat().st_size
    if size > 0 and raw / size > max_ratio:
        raise ImageReadError(path, f"decode budget: {height}x{width} pixels ({raw / 2**20:.0f} MiB raw) from a "
                                   f"{size / 1024:.0f} KiB file is a compression ratio of {raw / size:.0f}, "
                                   f"above {max_ratio:g} ({ENV_MAX_COMPRESSION_RATIO}); "
                                   "a decompression bomb? Raise the limit if the file is genuine")


def _check_finite_and_varying(path: Path, pixels: np.ndarray, stage: str = "") -> None:
    if not np.isfinite(pixels).all():
        bad = int((~np.isfinite(pixels)).sum())
        raise ImageReadError(path, f"{bad} NaN/inf pixel value(s){stage}")
    low, high = float(pixels.min()), float(pixels.max())
    if low == high:
        raise ImageReadError(path, f"all pixels equal ({low:g}){stage}: no image content")


def _min_max(pixels: np.ndarray) -> np.ndarray:
    low, high = pixels.min(), pixels.max()
    return ((pixels - low) / (high - low)).astype(np.float32)


def _luminance(pixels: np.ndarray) -> np.ndarray:
    """``(H, W, C>=3)`` colour → ``(H, W)`` BT.601 luminance; channels past the third are ignored."""
    return pixels[..., :3].astype(np.float64) @ _LUMA_WEIGHTS


# ---------------------------------------------------------------------------------------------
# Pillow (PNG, JPEG, TIFF ...)

# Divisor that maps each integer mode to [0, 1].
_MODE_SCALE = {"1": 1.0, "L": 255.0, "LA": 255.0, "I;16": 65535.0, "I;16L": 65535.0,
               "I;16B": 65535.0, "I;16N": 65535.0}


def _open_pillow(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image file (expected PNG, JPEG or DICOM)") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"image too large for Pillow: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"truncated or corrupt image header: {exc}") from None


def _read_pillow(path: Path, max_pixels: int) -> np.ndarray:
    with _open_pillow(path) as image:
        width, height = image.size
        _check_pixel_count(path, height, width, max_pixels)
        check_decode_budget(path, height, width, _sample_bytes(image))
        fmt = image.format or "image"
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageReadError(path, f"truncated or corrupt {fmt} data: {exc}") from None
        pixels, scale = _pillow_to_array(image)
    _check_finite_and_varying(path, pixels)
    if scale is None:  # float or 32-bit data with no fixed range
        return _min_max(pixels)
    return np.clip(pixels / scale, 0.0, 1.0).astype(np.float32)


def _sample_bytes(image: Image.Image) -> int:
    """Raw bytes per pixel of an opened (not loaded) Pillow image, all bands."""
    per_band = {"1": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "I": 4, "F": 4}.get(image.mode, 1)
    return per_band * len(image.getbands())


def _pillow_to_array(image: Image.Image) -> tuple[np.ndarray, float | None]:
    """Pixels as ``float64 (H, W)`` and the divisor that maps them to ``[0, 1]`` (None: min-max)."""
    mode = image.mode
    if mode in _MODE_SCALE:
        pixels = np.asarray(image.getchannel(0) if mode == "LA" else image)
        return pixels.astype(np.float64), _MODE_SCALE[mode]
    if mode == "I":
        pixels = np.asarray(image).astype(np.float64)
        # 16-bit PNGs may open as 32-bit "I": keep the 16-bit scale when the values fit it.
        fits_16_bit = pixels.size and pixels.min() >= 0 and pixels.max() <= 65535
        return pixels, (65535.0 if fits_16_bit else None)
    if mode == "F":
        return np.asarray(image).astype(np.float64), None
    if mode in ("RGB", "RGBA"):
        return _luminance(np.asarray(image)), 255.0
    # Palette, CMYK, YCbCr, LAB, HSV ...: let Pillow produce RGB first.
    return _luminance(np.asarray(image.convert("RGB"))), 255.0


# ---------------------------------------------------------------------------------------------
# DICOM


def _has_dicom_magic(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(_DICOM_MAGIC_OFFSET)
        return handle.read(4) == b"DICM"


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() in _DICOM_SUFFIXES or _has_dicom_magic(path)


def _dcmread(path: Path, *, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    except InvalidDicomError as exc:
        raise ImageReadError(path, f"not a valid DICOM file: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types (struct.error, ...) on corrupt bytes
        raise ImageReadError(path, f"corrupt DICOM header ({type(exc).__name__})") from None
    if not _has_dicom_magic(path) and "SOPClassUID" not in ds and "Rows" not in ds:
        # force=True parses almost any bytes; without the marker, demand real image elements.
        raise ImageReadError(path, "not a DICOM file: no 'DICM' marker and no DICOM image elements")
    return ds


@contextmanager
def _corrupt_dicom_guard(path: Path, part: str) -> Iterator[None]:
    """Turn any error while reading DICOM elements into ImageReadError naming only its type.

    pydicom converts elements lazily, so a damaged element raises (of many types) when first
    read, not in ``dcmread``. The exception text is left out: it may quote raw element bytes,
    patient identifiers included.
    """
    try:
        yield
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise ImageReadError(path, f"corrupt DICOM {part} ({type(exc).__name__})") from None


def _redact(message: str, ds: object) -> str:
    """Remove the values of patient-identifying elements of ``ds`` from ``message``.

    When an identifying element cannot be read (damaged), its value cannot be searched for, so
    the whole message is withheld.
    """
    for keyword in _IDENTIFYING_KEYWORDS:
        try:
            value = getattr(ds, keyword, None)
        except Exception:  # noqa: BLE001 - a damaged element raises any type
            return "details withheld (damaged patient elements)"
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            text = str(item).strip() if item is not None else ""
            if len(text) >= 2:
                message = re.sub(re.escape(text), "<redacted>", message, flags=re.IGNORECASE)
    return message


def _read_dicom(path: Path, max_pixels: int) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _dcmread(path)
    with _corrupt_dicom_guard(path, "header"):
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise ImageReadError(path, "DICOM file has no PixelData element (not an image)")
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if rows == 0 or cols == 0:
            raise ImageReadError(path, "DICOM header has no Rows/Columns")
        _check_pixel_count(path, rows, cols, max_pixels)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
        check_decode_budget(path, rows, cols, samples * max(1, bits // 8), max_ratio=float("inf"))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames != 1:
            raise ImageReadError(path, f"multi-frame DICOM ({frames} frames); expected one radiograph")
        _check_transfer_syntax(path, ds)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        raw = ds.pixel_array
    except Exception as exc:  # pydicom/pylibjpeg raise many types for bad pixel data
        reason = _redact(f"{type(exc).__name__}: {exc}", ds)
        raise ImageReadError(path, f"cannot decode DICOM pixel data: {reason}") from None

    if raw.ndim == 3:  # colour (RGB after pydicom's YBR conversion): luminance, no LUTs
        pixels = _luminance(raw)
    else:
        with _corrupt_dicom_guard(path, "rescale/VOI LUT elements"):
            pixels = apply_modality_lut(raw, ds).astype(np.float64)
            _check_finite_and_varying(path, pixels, " after RescaleSlope/Intercept")
            pixels = np.asarray(apply_voi_lut(pixels, ds), dtype=np.float64)
    _check_finite_and_varying(path, pixels, " after VOI LUT/windowing")
    scaled = _min_max(pixels)
    if photometric == "MONOCHROME1":
        scaled = (1.0 - scaled).astype(np.float32)
    return scaled


def _check_transfer_syntax(path: Path, ds: object) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    uid = UID(str(getattr(meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2.1"))
    name = f"{uid.name} ({uid})" if uid.name != str(uid) else str(uid)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise ImageReadError(path, f"unsupported transfer syntax {name}: no pixel decoder") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a plugin"
        raise ImageReadError(
            path, f"unsupported transfer syntax {name}: decoder needs {missing}"
        )


__all__ = ["DEFAULT_MAX_COMPRESSION_RATIO", "DEFAULT_MAX_DECODE_BYTES", "DEFAULT_MAX_PIXELS",
           "check_decode_budget", "read_image", "read_image_size"]
