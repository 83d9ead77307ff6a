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


def _png(path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32), dtype=np.uint8)).save(path)


def test_an_unterminated_csv_quote_is_an_error_naming_its_line(tmp_path):
    from cxrdistill.data.sources import get_source
    from cxrdistill.errors import ManifestError

    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name)
    (tmp_path / "labels.csv").write_text(
        'image,labels\na.png,nodule\nb.png,"nodule\nc.png,effusion\n', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"labels.csv:3: a quote opened on this line is never closed"):
        get_source("csv")(tmp_path, on_error="lenient", labels_col="labels")


def test_one_image_on_two_csv_rows_with_different_labels_names_both_rows(tmp_path):
    from cxrdistill.data.sources import get_source
    from cxrdistill.errors import ManifestError

    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text(
        "image,labels\na.png,nodule\nb.png,effusion\na.png,effusion\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"labels.csv:4.*a.png.*\['effusion'\].*\['nodule'\] on labels.csv:2"):
        get_source("csv")(tmp_path, on_error="strict", labels_col="labels")
    raw = get_source("csv")(tmp_path, on_error="lenient", labels_col="labels")
    kept = [img["file_name"] for img in raw["images"] if not img.get("rejected")]
    assert "b.png" in kept and "a.png" not in kept, raw["images"]
    # the same labels on a repeated row are not a conflict
    (tmp_path / "labels.csv").write_text("image,labels\na.png,nodule\na.png,nodule\n", encoding="utf-8")
    assert len(get_source("csv")(tmp_path, on_error="strict", labels_col="labels")["images"]) == 1


class _Evil:
    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_a_malicious_checkpoint_is_refused_without_the_weights_only_false_advice(tmp_path):
    import torch

    from cxrdistill.engine.checkpoint import load_checkpoint
    from cxrdistill.errors import CheckpointError
    from cxrdistill.models.pretrained import read_state_dict

    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    for load in (load_checkpoint, read_state_dict):
        with pytest.raises(CheckpointError) as info:
            load(path)
        text = str(info.value)
        assert "evil.pt" in text and "refused to load" in text and "getcwd" in text, text
        assert "weights_only" not in text and "will likely succeed" not in text, text
        assert info.value.__cause__ is None  # the chained PyTorch message is not printed either
