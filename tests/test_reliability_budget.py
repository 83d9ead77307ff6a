"""Issue #21 (second pass, smaller items): decode budget, CSV quotes and labels, checkpoint refusal."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrdistill.data.io import read_image
from cxrdistill.errors import ImageReadError


def test_a_7000x7000_png_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    image = Image.new("L", (7000, 7000), 0)
    image.paste(128, (0, 0, 50, 50))  # not constant: without a budget it would decode (1.4 GB)
    path = tmp_path / "bomb.png"
    image.save(path)
    assert path.stat().st_size < 200_000

    def no_decode(self):  # the refusal must come before any pixel is decoded
        raise AssertionError("decoded")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    with pytest.raises(ImageReadError, match="decode budget.*compression ratio") as info:
        read_image(path)
    assert "bomb.png" in str(info.value)


def test_the_decode_budget_is_configurable(tmp_path, monkeypatch):
    pixels = np.zeros((64, 64), np.uint8)
    pixels[:8] = 200
    path = tmp_path / "flat.png"
    Image.fromarray(pixels).save(path)
    assert read_image(path).shape == (64, 64)  # a normal small image passes the defaults
    monkeypatch.setenv("CXRDISTILL_MAX_DECODE_BYTES", "1000")
    with pytest.raises(ImageReadError, match="flat.png.*decode budget.*CXRDISTILL_MAX_DECODE_BYTES"):
        read_image(path)
    monkeypatch.delenv("CXRDISTILL_MAX_DECODE_BYTES")
    monkeypatch.setenv("CXRDISTILL_MAX_COMPRESSION_RATIO", "1.5")
    with pytest.raises(ImageReadError, match="compression ratio"):
        read_image(path)
