"""The HTML report: sections, embedded images, side-by-side runs, missing pieces noted."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from cxrdistill.eval.html_report import build_report


def make_run(root: Path, name: str = "run_a", seed: int = 0, with_log: bool = True) -> Path:
    """A fake run: 6 tiny PNGs (64 px) in a manifest (4 test, 2 train), predictions, scores, log, heat map."""
    rng = np.random.default_rng(seed)
    data = root / "data"
    (data / "img").mkdir(parents=True, exist_ok=True)
    images, anns, rows, scores = [], [], [], []
    for i in range(1, 7):
        Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(data / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"img/{i}.png", "width": 64, "height": 64,
                       "split": "test" if i <= 4 else "train", "supervision": "box"})
        if i % 2:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20],
                         "area": 400, "iscrowd": 0})
            rows.append({"image_id": i, "category_id": 1, "bbox": [12, 11, 20, 19], "score": 0.8 - 0.1 * seed})
        rows.append({"image_id": i, "category_id": 1, "bbox": [40, 40, 10, 10], "score": float(rng.random() * 0.5)})
        scores += [{"image_id": i, "category_id": c, "score": float(rng.random())} for c in (1, 2)]
    manifest = data / "manifest.json"
    manifest.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 1, "name": "nodule"}, {"id": 2, "name": "pneumothorax"}]}))
    run = root / name
    (run / "eval" / "heatmaps").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "teacher_student", "data": {"manifest": str(manifest)}}))
    (run / "eval" / "predictions.json").write_text(json.dumps(rows))
    (run / "eval" / "image_scores.json").write_text(json.dumps(scores))
    Image.fromarray(np.full((16, 16), 200, np.uint8)).save(run / "eval" / "heatmaps" / "1.png")
    if with_log:
        with (run / "metrics.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "stage", "loss", "val_mAP"])
            for s in range(10):
                w.writerow([s, "teacher" if s < 5 else "student", 1 / (s + 1), "" if s % 3 else s / 10])
    return run


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_has_every_section_and_embedded_images(tmp_path):
    run = make_run(tmp_path)
    page = build_report([run], tmp_path / "out" / "report.html").read_text()
    for sid in ("metrics-0", "curves-0", "images-0", "training-0", "config-0"):
        assert f'id="{sid}"' in page
    assert "teacher_student" in page and "nodule" in page
    assert "no eval/metrics.json" in page and "macro AUROC" in page  # computed from predictions, and said so
    pngs = embedded_pngs(page)
    # 3 PR + ROC + FROC + 4 test images + training curves
    assert len(pngs) == 10
    assert all(Image.open(io.BytesIO(p)).size[0] > 50 for p in pngs)
    assert "src=\"http" not in page and "file://" not in page  # self-contained


def test_two_runs_side_by_side_and_missing_pieces_are_notes(tmp_path):
    a = make_run(tmp_path, "run_a")
    b = make_run(tmp_path, "run_b", seed=1, with_log=False)
    (a / "eval" / "metrics.json").write_text(json.dumps({
        "split": "test", "class_names": ["nodule", "pneumothorax"],
        "detection": {"iou_thresholds": [0.5], "mAP": 0.5, "mAP@0.5": 0.5,
                      "per_class": {"nodule": {"AP": 0.5}, "pneumothorax": {"AP": None}}}}))
    empty = tmp_path / "run_empty"
    empty.mkdir()
    page = build_report([a, b, empty], tmp_path / "r.html").read_text()
    assert 'id="comparison"' in page and "Paired bootstrap" in page
    assert page.count("<th>run_a</th>") == 1 and "<th>run_empty</th>" in page
    assert "no metrics.csv" in page and "no config.yaml" in page and "manifest not found" in page
    assert 'class="undef">undefined' in page  # pneumothorax AP None
