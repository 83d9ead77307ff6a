"""`cxrdistill predict` on a manifest and on a folder, for each model kind; output is evaluable."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cxrdistill.cli import app
from cxrdistill.config import ModelConfig
from cxrdistill.data.study import synthetic_world
from cxrdistill.data.synthetic import SYNTHETIC_CLASSES
from cxrdistill.errors import CheckpointError
from cxrdistill.models.factory import build_model, export_model, load_exported_model

TINY = {"detector": {"fpn_channels": 16, "head_convs": 1, "fpn_levels": [3, 4, 5]},
        "heatmap": {"fpn_channels": 16}, "classifier": {"tiny": True}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world({"n_images": 20, "image_size": 48, "seed": 2}, tmp_path_factory.mktemp("w"))


@pytest.mark.parametrize("kind", ["detector", "heatmap", "classifier"])
def test_export_load_and_predict(kind, world, tmp_path, monkeypatch):
    monkeypatch.setenv("CXRDISTILL_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, depth=18, base_width=8, options=TINY[kind])
    model = build_model(cfg, len(SYNTHETIC_CLASSES))
    path = export_model(tmp_path / "run" / "model.pt", model, cfg, list(SYNTHETIC_CLASSES), image_size=32)
    again, meta = load_exported_model(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    assert meta["class_names"] == list(SYNTHETIC_CLASSES)

    out = tmp_path / "pred"
    res = CliRunner().invoke(app, ["predict", "-m", str(tmp_path / "run"), "--manifest", str(world),
                                   "-o", str(out), "--heatmaps"])
    assert res.exit_code == 0, res.output
    scores = json.loads((out / "image_scores.json").read_text())
    n_test = sum(1 for im in json.loads(world.read_text())["images"] if im["split"] == "test")
    assert len(scores) == n_test * len(SYNTHETIC_CLASSES)
    ev = CliRunner().invoke(app, ["evaluate", "--manifest", str(world), "--predictions", str(out / "predictions.json"),
                                  "--image-scores", str(out / "image_scores.json"), "--n-boot", "10"])
    assert ev.exit_code == 0, ev.output
    if kind == "heatmap":
        assert list((out / "heatmaps").glob("*.png"))

    folder = tmp_path / "pred_folder"
    res = CliRunner().invoke(app, ["predict", "-m", str(path), "--images", str(world.parent / "images"), "-o", str(folder)])
    assert res.exit_code == 0, res.output
    assert (folder / "images_manifest.json").is_file()
    assert len(json.loads((folder / "image_scores.json").read_text())) == 20 * len(SYNTHETIC_CLASSES)


def test_loading_something_else_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a cxrdistill model export"):
        load_exported_model(tmp_path / "other.pt")
