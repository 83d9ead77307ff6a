"""Learnability of the synthetic world: the supervised detector of configs/supervised_detector.yaml
learns clearly from ~200 boxed images and clearly less from ~20 (data-hungry).

A reduced version of docs/results.md: the packaged config with fewer optimizer steps,
both runs evaluated on the same test images, and the paired-bootstrap 95% CI of the mAP@0.5
difference (200 - 20 boxed) must lie above zero. About 30 CPU-s per run, ~70 s in all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cxrdistill.cli import app
from cxrdistill.data.manifest import load_manifest
from cxrdistill.data.splits import make_semi_split
from cxrdistill.eval.compare import compare_detection
from cxrdistill.eval.predictions import load_ground_truth, load_predictions
from cxrdistill.resources import resolve_config_path

runner = CliRunner()

STEPS = 250  # reduced from the config's schedule
FRACTIONS = {"few": 0.1, "many": 1.0}  # 20 vs 200 boxed training images of the 400-image world


def _train(out: Path, boxed_fraction: float) -> dict[str, float]:
    args = ["train", "--config", str(resolve_config_path("supervised_detector")), "--output-dir", str(out),
            f"data.boxed_fraction={boxed_fraction}", f"train.max_steps={STEPS}", "train.progress=false",
            "train.tensorboard=false", "train.checkpoint_every=1000", "method.params.n_boot=0"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads((out / "final_metrics.json").read_text())


@pytest.mark.slow
def test_detector_learns_from_200_boxed_images_and_needs_them(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRDISTILL_CACHE", str(tmp_path / "cache"))
    runs = {name: tmp_path / name for name in FRACTIONS}
    metrics = {name: _train(runs[name], fraction) for name, fraction in FRACTIONS.items()}

    manifest = yaml.safe_load((runs["many"] / "config.yaml").read_text())["data"]["manifest"]
    world = load_manifest(manifest)
    boxed = {name: sum(im.supervision == "box" and im.split == "train"
                       for im in make_semi_split(world, boxed_fraction=f).images) for name, f in FRACTIONS.items()}
    assert boxed == {"few": 20, "many": 200}
    gt = load_ground_truth(manifest, "test")
    rows = {name: load_predictions(run / "eval" / "predictions.json", gt).rows for name, run in runs.items()}
    gap = compare_detection(gt, rows["few"], rows["many"], iou=0.5, n_boot=500, seed=0)

    print("learnability gap (200 - 20 boxed):", gap.to_dict())
    assert gap.b == pytest.approx(metrics["many"]["mAP@0.5"], abs=1e-6)
    assert metrics["many"]["mAP@0.5"] >= 0.25, metrics  # learns clearly from ~200 boxed images
    assert gap.ci_low > 0.0, gap.to_dict()  # and clearly less from ~20
