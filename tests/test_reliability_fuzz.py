"""Property-based fuzzing (issue #12): the manifest parser and the image decoders either succeed or
raise a CxrDistillError subclass, never another exception, on any input.

CI runs a small number of examples (derandomized, so reproducible). A long run:

    CXR_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_reliability_fuzz.py -q -s

prints how many inputs each property saw (the figures in docs/reliability.md).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless

from cxrdistill.data.io import read_image, read_image_size
from cxrdistill.data.manifest import Manifest, manifest_from_dict
from cxrdistill.errors import CxrDistillError, ManifestError
from test_reliability_inputs import png_bytes, ramp, write_dicom

EXAMPLES = int(os.environ.get("CXR_FUZZ_EXAMPLES", "200"))
BIG_RUN = "CXR_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not BIG_RUN, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
TRIED: Counter[str] = Counter()
WORK = Path(tempfile.mkdtemp(prefix="cxr-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    shutil.rmtree(WORK, ignore_errors=True)
    if BIG_RUN:
        print(f"\nfuzz inputs tried (none crashed): {dict(TRIED)}")


# ---------------------------------------------------------------------------------------------
# manifest_from_dict on generated dicts

ROOT = WORK / "root"
for _name in ("a.png", "b.png", "sub/c.png"):
    (ROOT / _name).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / _name).write_bytes(png_bytes(ramp()))

# A small alphabet (with a NUL, a non-ASCII letter and a lone surrogate) keeps generation fast.
text = st.text(alphabet=st.sampled_from(list("ab1./ _\x00\u00e9\udcff")), max_size=8)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.floats(),
                      text, st.sampled_from(["train", "test", "box", "none", "image", "a.png",
                                                            "../a.png", "/etc/passwd", "nodule", ""]))
json_value = st.one_of(json_leaf, st.lists(json_leaf, max_size=3), st.dictionaries(text, json_leaf, max_size=3),
                       st.lists(st.lists(json_leaf, max_size=2), max_size=2))
small_int = st.one_of(st.integers(0, 4), json_value)
category = st.fixed_dictionaries({"id": small_int, "name": st.one_of(st.sampled_from(["nodule", "mass"]), json_value)})
image = st.fixed_dictionaries(
    {"id": small_int, "file_name": st.one_of(st.sampled_from(["a.png", "b.png", "sub/c.png", "x.png",
                                                              "../a.png", "/abs.png", "a\x00.png"]), json_value),
     "width": st.one_of(st.integers(-1, 64), json_value), "height": st.one_of(st.integers(-1, 64), json_value)},
    optional={"split": st.one_of(st.sampled_from(["train", "val", "test"]), json_value),
              "supervision": st.one_of(st.sampled_from(["box", "image", "none"]), json_value),
              "labels": st.one_of(st.lists(st.sampled_from(["nodule", "mass", "cat"]), max_size=3), json_value),
              "report": st.one_of(text, json_value),
              "patient_id": st.one_of(st.sampled_from(["p1", "p2"]), json_value)})
number = st.one_of(st.floats(-10, 80), st.integers(-10, 80), st.floats(), json_leaf)
annotation = st.fixed_dictionaries(
    {"id": small_int, "image_id": small_int, "category_id": small_int,
     "bbox": st.one_of(st.lists(number, min_size=4, max_size=4), json_value)})
manifest_dict = st.fixed_dictionaries(
    {"categories": st.one_of(st.lists(category, max_size=3), json_value),
     "images": st.one_of(st.lists(image, max_size=5), json_value)},
    optional={"annotations": st.one_of(st.lists(annotation, max_size=5), json_value), "info": json_value})


@FUZZ
@given(raw=st.one_of(manifest_dict, json_value), on_error=st.sampled_from(["strict", "lenient"]))
def test_manifest_parser_loads_or_raises_manifest_error(raw, on_error):
    TRIED["manifest"] += 1
    try:
        manifest = manifest_from_dict(raw, root=ROOT, on_error=on_error)
    except ManifestError:
        return
    assert isinstance(manifest, Manifest)
    if on_error == "strict":
        assert not [i for i in manifest.skipped if i.action == "skipped"]
    # whatever was kept is usable and consistent
    ids = {im.id for im in manifest.images}
    assert len(ids) == len(manifest.images)
    for ann in manifest.annotations:
        assert ann.image_id in ids and all(math.isfinite(v) for v in ann.bbox) and ann.bbox[2] > 0
    for im in manifest.images:
        manifest.boxes_xyxy(im.id)
        manifest.image_labels(im.id)
        assert manifest.image_path(im).is_relative_to(ROOT.resolve())
    # nothing dropped silently: each input image row is kept or named in an issue
    rows = raw.get("images") if isinstance(raw, dict) else None
    if isinstance(rows, list):
        assert len(manifest.images) + sum(1 for i in manifest.skipped
                                          if i.record.startswith("image") and i.action == "skipped") >= len(rows)


# ---------------------------------------------------------------------------------------------
# decoders on random bytes and on mutated valid files


def _seeds() -> dict[str, bytes]:
    out = {"png": png_bytes(ramp()), "png16": png_bytes(ramp(high=65535)), "jpg": png_bytes(ramp(), "JPEG"),
           "rgb.png": png_bytes(np.repeat(ramp()[..., None], 3, axis=2))}
    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), mode="F").save(buf, "TIFF")
    out["tiff"] = buf.getvalue()
    path = WORK / "seed.dcm"
    out["dcm"] = write_dicom(path, ramp(high=4095)).read_bytes()
    import pydicom

    for name, syntax in (("rle.dcm", RLELossless), ("j2k.dcm", JPEG2000Lossless)):
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(WORK / name)
        out[name] = (WORK / name).read_bytes()
    return out


SEEDS = _seeds()
SUFFIX = {"png": ".png", "png16": ".png", "jpg": ".jpg", "rgb.png": ".png", "tiff": ".tiff", "dcm": ".dcm",
          "rle.dcm": ".dcm", "j2k.dcm": ".dcm"}


def _check_decoders(data: bytes, suffix: str) -> None:
    path = WORK / f"fuzz{suffix}"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom/Pillow warn on odd files; only exceptions matter here
        for call in (read_image_size, read_image):
            try:
                out = call(path, max_pixels=4_000_000) if call is read_image else call(path)
            except CxrDistillError:
                continue
            if call is read_image:
                assert out.dtype == np.float32 and out.ndim == 2
                assert np.isfinite(out).all() and 0.0 <= out.min() <= out.max() <= 1.0
            else:
                assert all(isinstance(v, int) and v >= 0 for v in out)


@FUZZ
@given(data=st.binary(max_size=600), suffix=st.sampled_from([".png", ".jpg", ".dcm", ".tiff", ".bin"]),
       dicom_magic=st.booleans())
def test_decoders_on_random_bytes(data, suffix, dicom_magic):
    TRIED["random bytes"] += 1
    if dicom_magic:  # reach the DICOM parser through the magic number as well
        data = bytes(128) + b"DICM" + data
    _check_decoders(data, suffix)


@st.composite
def mutated(draw) -> tuple[bytes, str]:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos: pos + draw(st.integers(1, 64))]
    return bytes(data), SUFFIX[name]


@FUZZ
@given(case=mutated())
def test_decoders_on_mutated_valid_files(case):
    TRIED["mutated files"] += 1
    _check_decoders(*case)
