"""`cxrdistill export`: ONNX (+ numpy post-processing) equals `predict`; a model folder loads back offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cxrdistill.cli import app
from cxrdistill.config import ModelConfig
from cxrdistill.data.study import StudyData, synthetic_world
from cxrdistill.data.synthetic import SYNTHETIC_CLASSES
from cxrdistill.eval.runs import evaluate_detector, predict_detections
from cxrdistill.models.factory import build_model, export_model

TINY = {"detector": {"fpn_channels": 16, "head_convs": 1, "fpn_levels": [3, 4, 5]},
        "heatmap": {"fpn_channels": 16}, "classifier": {"tiny": True}}
SIZE = 48


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world({"n_images": 16, "image_size": 64, "seed": 5}, tmp_path_factory.mktemp("w"))


def _run(kind, world, root, seed=0):
    """A run directory with model.pt, config.yaml and (detector) eval/ files."""
    torch.manual_seed(seed)
    cfg = ModelConfig(kind=kind, depth=18, base_width=8, options=TINY[kind])
    model = build_model(cfg, len(SYNTHETIC_CLASSES)).eval()
    run = root / f"run_{kind}"
    export_model(run / "model.pt", model, cfg, list(SYNTHETIC_CLASSES), image_size=SIZE)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"manifest": str(world)}}))
    return run, model


def _test_set(world, tmp_path):
    return StudyData.open(world, image_size=SIZE, cache_dir=tmp_path / "cache").dataset("test")


def test_onnx_detector_matches_predict(world, tmp_path):
    pytest.importorskip("onnxruntime")
    from cxrdistill.deploy.runtime import OnnxModel

    run, model = _run("detector", world, tmp_path)
    res = CliRunner().invoke(app, ["export", "-m", str(run), "--format", "onnx", "-o", str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    onnx_model = OnnxModel(tmp_path / "onnx")
    dataset = _test_set(world, tmp_path)
    ref = predict_detections(model, dataset, score_thresh=0.0)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))]).numpy()
    dets = onnx_model.detect(images, score_thresh=0.0)
    assert len(dets) == len(dataset) > 0
    for rec, det in zip(dataset.images, dets):
        want = ref[rec.id]
        assert len(det["boxes"]) == len(want["boxes"]) > 0
        np.testing.assert_array_equal(det["labels"], want["labels"].numpy())
        np.testing.assert_allclose(det["scores"], want["scores"].numpy(), atol=1e-5)
        np.testing.assert_allclose(det["boxes"], want["boxes"].numpy(), atol=1e-3)
    # a file straight from disk: Pillow's resize stays close to the training cache's
    rec = dataset.images[0]
    rows = onnx_model.predict_file(world.parent / rec.file_name, score_thresh=0.0)
    assert {r["class"] for r in rows} <= set(SYNTHETIC_CLASSES)
    top = ref[rec.id]["scores"][0].item()
    assert abs(rows[0]["score"] - top) < 1e-2


@pytest.mark.parametrize("kind", ["heatmap", "classifier"])
def test_onnx_probability_models(kind, world, tmp_path):
    pytest.importorskip("onnxruntime")
    from cxrdistill.deploy.runtime import OnnxModel

    run, model = _run(kind, world, tmp_path)
    res = CliRunner().invoke(app, ["export", "-m", str(run), "--format", "onnx", "-o", str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    x = torch.rand(3, 1, SIZE, SIZE)
    with torch.no_grad():
        want = torch.sigmoid(model(x)).numpy()
    got = OnnxModel(tmp_path / "onnx").raw(x.numpy())[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_folder_round_trip_and_model_card(world, tmp_path):
    run, model = _run("detector", world, tmp_path, seed=1)
    evaluate_detector(model, _test_set(world, tmp_path), run / "eval", split="test", n_boot=20)
    out = tmp_path / "folder"
    res = CliRunner().invoke(app, ["export", "-m", str(run), "--format", "folder", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    for part in ("Training data", "Test metrics", "95% CI", "Intended use", "Limits", "mAP@0.5"):
        assert part in card
    assert "not computed" not in card.split("## Test metrics")[1].split("macro AUROC")[0]
    assert json.loads((out / "config.json").read_text())["class_names"] == list(SYNTHETIC_CLASSES)

    preds = {}
    for name, source in (("run", run), ("folder", out)):
        res = CliRunner().invoke(app, ["predict", "-m", str(source), "--manifest", str(world), "-o",
                                       str(tmp_path / f"pred_{name}"), "--score-thresh", "0.0"])
        assert res.exit_code == 0, res.output
        preds[name] = json.loads((tmp_path / f"pred_{name}" / "predictions.json").read_text())
    assert preds["run"] and preds["folder"] == preds["run"]


def test_folder_with_wrong_weights_is_refused(world, tmp_path):
    from safetensors.torch import save_file

    from cxrdistill.deploy.folder import load_model
    from cxrdistill.errors import CheckpointError

    run, _ = _run("detector", world, tmp_path)
    out = tmp_path / "folder"
    CliRunner().invoke(app, ["export", "-m", str(run), "--format", "folder", "-o", str(out)])
    save_file({"x": torch.zeros(2)}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(out)


def test_the_runtime_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys; import cxrdistill.deploy.runtime, cxrdistill.deploy.postprocess; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
