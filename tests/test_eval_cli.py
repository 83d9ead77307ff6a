"""`cxrdistill evaluate` and `cxrdistill report` through the CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cxrdistill.cli import app
from test_eval_report import make_run

runner = CliRunner()


def test_evaluate_prints_table_and_writes_metrics(tmp_path):
    run = make_run(tmp_path)
    manifest = tmp_path / "data" / "manifest.json"
    out = tmp_path / "metrics.json"
    res = runner.invoke(app, ["evaluate", "--manifest", str(manifest), "--predictions", str(run / "eval" / "predictions.json"),
                              "--image-scores", str(run / "eval" / "image_scores.json"), "--n-boot", "50",
                              "--out", str(out), "--iou", "0.25", "0.5", "0.75"])
    assert res.exit_code == 0, res.output
    assert "nodule" in res.output and "undefined" in res.output  # pneumothorax has no boxes
    assert "3 prediction(s) for images outside split 'test'" in res.output
    m = json.loads(out.read_text())
    assert m["n_images"] == 4 and m["detection"]["iou_thresholds"] == [0.25, 0.5, 0.75]
    assert m["detection"]["per_class"]["nodule"]["AP@0.5"] == 1.0
    assert m["detection"]["per_class"]["pneumothorax"]["AP"] is None
    assert m["froc"]["per_class"]["nodule"]["score"] == 1.0
    assert m["classification"]["score_source"].endswith("image_scores.json")

    res = runner.invoke(app, ["evaluate", "--manifest", str(manifest), "--predictions", str(run / "eval" / "predictions.json"),
                              "--n-boot", "20", "--iou", "0.4:0.75:0.05", "--backend", "pycocotools", "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert len(m["detection"]["iou_thresholds"]) == 8 and m["classification"]["score_source"] == "max box score per class"


def test_evaluate_reports_bad_input_clearly(tmp_path):
    run = make_run(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]))
    res = runner.invoke(app, ["evaluate", "--manifest", str(tmp_path / "data" / "manifest.json"), "--predictions", str(bad)])
    assert res.exit_code == 2 and "image_id 99 is not an image of the manifest" in res.output
    res = runner.invoke(app, ["evaluate", "--manifest", str(tmp_path / "data" / "manifest.json"),
                              "--predictions", str(run / "eval" / "predictions.json"), "--iou", "1.5"])
    assert res.exit_code == 2 and "(0, 1]" in res.output


def test_report_command_writes_html(tmp_path):
    run = make_run(tmp_path)
    res = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "rep.html"), "--max-images", "2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep.html").read_text().count("data:image/png;base64,") == 8  # 3 PR, ROC, FROC, 2 images, log


def test_evaluate_modified_froc_from_heatmaps_and_boxes(tmp_path):
    import numpy as np
    from PIL import Image

    run = make_run(tmp_path)
    maps = tmp_path / "maps"
    maps.mkdir()
    for iid in range(1, 5):  # 32 px maps of 64 px images; nodule box [10,10,20,20] → map pixels 5..15
        m = np.zeros((32, 32), np.uint8)
        if iid % 2:
            m[6:14, 6:14] = 255  # inside the box only, covers the centre (10, 10)
        Image.fromarray(m).save(maps / f"{iid}_1.png")
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(maps / f"{iid}_2.png")
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["evaluate", "--manifest", str(tmp_path / "data" / "manifest.json"),
                              "--predictions", str(run / "eval" / "predictions.json"), "--n-boot", "10",
                              "--heatmaps", str(maps), "--modified-froc", "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert m["modified_froc_heatmaps"]["per_class"]["nodule"]["score"] == 1.0
    assert m["modified_froc_heatmaps"]["per_class"]["pneumothorax"]["score"] is None
    assert 0 < m["modified_froc_boxes"]["per_class"]["nodule"]["score"] <= 1.0
    (maps / "4_1.png").unlink()
    res = runner.invoke(app, ["evaluate", "--manifest", str(tmp_path / "data" / "manifest.json"),
                              "--predictions", str(run / "eval" / "predictions.json"), "--heatmaps", str(maps)])
    assert res.exit_code == 2 and "no heat map for image 4, class 'nodule'" in res.output
