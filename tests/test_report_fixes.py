"""Issue 22's bug list, one test each: image_root, seed labels, the study's metric in the paired
test, OXnet in a mAP@0.25 study, reports-only CSVs, the class table at 80 columns, wall_s,
detector image_scores.json, the final table once, and a prepared split over packaged defaults."""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from cxrdistill.cli import app
from cxrdistill.eval.html_report import build_report
from test_eval_report import make_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic={n_images: 40, image_size: 32, seed: 3}", "data.image_size=32", "train.max_steps=2",
        "train.batch_size=2", "train.progress=false", "train.tensorboard=false", "model.options.fpn_channels=8",
        "model.options.head_convs=1", "method.params.n_boot=10"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CXRDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# ------------------------------------------------------------------------------------------ report


def test_report_draws_images_when_the_manifest_lives_outside_the_image_folder(tmp_path):
    run = make_run(tmp_path)
    data = tmp_path / "data"
    elsewhere = tmp_path / "manifests"
    elsewhere.mkdir()
    raw = json.loads((data / "manifest.json").read_text())
    raw["info"] = {"image_root": "../data"}
    (elsewhere / "m.json").write_text(json.dumps(raw))
    (data / "manifest.json").unlink()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"manifest": str(elsewhere / "m.json")}}))
    page = build_report([run], tmp_path / "out" / "report.html").read_text()
    assert "could not be read" not in page
    images = page.split('id="images-0"')[1].split('id="training-0"')[0]
    assert images.count("data:image/png") == 4  # the 4 test images


def test_report_is_a_supplement(tmp_path):
    run = make_run(tmp_path)
    (run / "environment.json").write_text(json.dumps({
        "python": "3.11.0", "packages": {"torch": "2.13.0"}, "git_commit": None,
        "argv": ["/x/bin/cxrdistill", "train", "--config", str(tmp_path / "c.yaml")]}))
    (run / "model.pt").write_bytes(b"weights")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["boxed_fraction"] = 0.5  # the run re-split supervision: the data table shows that split
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out" / "report.html"
    page = build_report([run], out, n_boot=30).read_text()
    assert "Supervision as the run trained" in page and "data.boxed_fraction=0.5" in page
    metrics = page.split('id="metrics-0"')[1].split('id="data-0"')[0]
    for name in ("mAP@0.5", "FROC (mean)", "macro AUROC"):
        row = re.search(rf"<td>{re.escape(name)}</td><td>[^<]*</td><td>([^<]*)</td>", metrics)
        assert row and re.fullmatch(r"\[-?\d\.\d{3}, \d\.\d{3}\]", row.group(1)), name
    assert "Data and splits" in page and "supervision box" in page
    assert "FROC operating point at 1 false positive(s) per image" in page
    import hashlib
    assert hashlib.sha256(b"weights").hexdigest() in page
    assert "not a git checkout" in page and "cxrdistill train --config ../c.yaml" in page
    assert str(tmp_path) not in page  # no absolute local path anywhere
    files = sorted(p.name for p in (tmp_path / "out" / "report_files").iterdir())
    assert "run_a_froc.svg" in files and "run_a_metrics.csv" in files and "run_a_metrics.tex" in files
    assert (tmp_path / "out" / "report_files" / "run_a_roc.svg").read_text().lstrip().startswith("<?xml")
    with (tmp_path / "out" / "report_files" / "run_a_metrics.csv").open() as f:
        assert next(csv.reader(f)) == ["metric", "value", "95% CI"]
    assert r"\begin{tabular}" in (tmp_path / "out" / "report_files" / "run_a_metrics.tex").read_text()
    # a user-set threshold is stated, and draws fewer boxes than a threshold of 0
    high = build_report([run], tmp_path / "hi.html", score_threshold=0.75).read_text()
    low = build_report([run], tmp_path / "lo.html", score_threshold=0.0).read_text()
    assert "score ≥ 0.75 (set by the user)" in high
    drawn = [int(re.search(r"\((\d+) drawn\)", p).group(1)) for p in (high, low)]
    assert drawn[0] < drawn[1]


def test_paired_test_uses_the_given_metric_and_names(tmp_path):
    a = make_run(tmp_path, "seed0")
    b = tmp_path / "b" / "seed0"  # the same manifest, weaker predictions
    shutil.copytree(a, b)
    rows = json.loads((b / "eval" / "predictions.json").read_text())
    (b / "eval" / "predictions.json").write_text(json.dumps([dict(r, score=r["score"] / 2) for r in rows[::2]]))
    page = build_report([a, b], tmp_path / "r.html", names=["supervised (seed 0)", "tsd (seed 0)"],
                        metric="mAP@0.25").read_text()
    assert "tsd (seed 0) − supervised (seed 0)" in page
    assert "Paired bootstrap over images (mAP@0.25" in page
    unnamed = build_report([a, a], tmp_path / "u.html").read_text()
    assert "seed0 − seed0" not in unnamed


# ------------------------------------------------------------------------------------------ study


def test_study_with_oxnet_and_map025_builds_its_table_with_real_seed_labels(tmp_path):
    from cxrdistill.study import make_study, run_study

    spec = make_study({
        "name": "ox", "output_dir": str(tmp_path / "study"), "fractions": [0.3], "seeds": [1], "n_boot": 10,
        "metric": "mAP@0.25", "overrides": TINY,
        "recipes": {"supervised": {"config": str(ROOT / "configs/supervised_detector.yaml")},
                    "oxnet": {"config": str(ROOT / "configs/oxnet.yaml"),
                              "overrides": ["method.params.base_only=true", "data.weak_fraction=0.3"]}}})
    result = run_study(spec, console=Console(quiet=True), keep_going=False)
    assert not result.failed
    ox = next(c for c in result.cells if c.recipe == "oxnet")
    assert "mAP@0.25" not in json.loads((ox.run_dir / "final_metrics.json").read_text())  # the old crash
    row = next(r for r in result.table["rows"] if r["recipe"] == "oxnet")
    assert row["fractions"]["f0.3"]["mean"] is not None and row["fractions"]["f0.3"]["vs_baseline"]
    page = (tmp_path / "study" / "report_f0.3.html").read_text()
    assert "oxnet (seed 1) − supervised (seed 1)" in page and "seed0" not in page
    assert "Paired bootstrap over images (mAP@0.25" in page
    for name in ("table.csv", "table.tex", "fraction_curve.svg"):
        assert (tmp_path / "study" / name).is_file()


# ------------------------------------------------------------------------------------------ CLI


def test_label_reports_on_a_reports_only_csv(tmp_path):
    src = tmp_path / "reports.csv"
    src.write_text("id,report\n1,Right pleural effusion. No pneumothorax.\n2,No acute findings.\n3,\n")
    out = tmp_path / "labels.csv"
    res = CliRunner().invoke(app, ["label-reports", "--reports", str(src), "-o", str(out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == ["1", "2", "3"]
    effusion = next(k for k in rows[0] if "effusion" in k.lower())
    pneumothorax = next(k for k in rows[0] if "pneumothorax" in k.lower())
    assert rows[0][effusion] == "positive" and rows[0][pneumothorax] == "negative"
    assert rows[1][effusion] == "absent" and rows[2][effusion] == "absent"
    bad = CliRunner().invoke(app, ["label-reports", "--reports", str(src), "-o", str(out), "--text-col", "text"])
    assert bad.exit_code == 2 and "no column 'text'" in bad.output


def test_prepare_class_table_is_readable_with_14_classes_at_80_columns():
    from cxrdistill.data.manifest import manifest_from_dict
    from cxrdistill.data.summary import summary_table

    names = [f"finding number {i}" for i in range(14)]
    images = [{"id": i + 1, "file_name": f"{i}.png", "width": 10, "height": 10,
               "split": ("train", "val", "test")[i % 3], "supervision": "box"} for i in range(6)]
    anns = [{"id": i + 1, "image_id": 1 + i % 6, "category_id": 1 + i % 14, "bbox": [1, 1, 3, 3]} for i in range(20)]
    m = manifest_from_dict({"images": images, "annotations": anns,
                            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]},
                           root=Path("."), check_files=False)
    console = Console(width=80, record=True, color_system=None)
    console.print(summary_table(m, title="m.json"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in names:  # every class name whole, on one line
        assert any(name in line for line in text.splitlines()), name
    assert "finding number 0" in text and "train" in text


def test_metrics_csv_has_a_wall_clock_column_that_continues_on_resume(tmp_path):
    from cxrdistill.engine.logging import MetricsLogger, read_metrics

    log = MetricsLogger(tmp_path / "metrics.csv", "s")
    log.log(1, {"loss": 1.0})
    time.sleep(0.05)
    log.log(2, {"loss": 0.5})
    rows = read_metrics(tmp_path / "metrics.csv")
    assert 0 <= rows[0]["wall_s"] < rows[1]["wall_s"] and rows[1]["wall_s"] >= 0.05
    again = MetricsLogger(tmp_path / "metrics.csv", "s")
    again.log(3, {"loss": 0.2})
    assert read_metrics(tmp_path / "metrics.csv")[-1]["wall_s"] >= rows[1]["wall_s"]


def test_detector_run_writes_image_scores_and_prints_the_final_table_once(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--config", str(ROOT / "configs/supervised_detector.yaml"), *TINY,
                                   "--output-dir", str(out)])
    assert res.exit_code == 0, res.output
    assert len(re.findall(r"mAP@0\.5\s", res.output)) == 1
    scores = json.loads((out / "eval" / "image_scores.json").read_text())
    preds = json.loads((out / "eval" / "predictions.json").read_text())
    test_ids = {r["image_id"] for r in scores}
    assert len(scores) == len(test_ids) * 5
    best = {}
    for r in preds:
        key = (r["image_id"], r["category_id"])
        best[key] = max(best.get(key, 0.0), r["score"])
    for r in scores:
        assert r["score"] == pytest.approx(best.get((r["image_id"], r["category_id"]), 0.0), abs=1e-5)
    assert "wall_s" in (out / "metrics.csv").read_text().splitlines()[0]


def test_a_prepared_split_wins_over_a_packaged_boxed_fraction(tmp_path):
    from cxrdistill.config import load_config
    from cxrdistill.data.split_policy import apply_split_policy

    packaged = ROOT / "src/cxrdistill/configs/supervised_detector.yaml"
    manifest = ["data.manifest=/data/m.json"]
    cfg = load_config(packaged, manifest)
    line = apply_split_policy(cfg.data, packaged, manifest)
    assert cfg.data.boxed_fraction is None and "manifest's own split" in line and "boxed_fraction=0.2" in line
    over = manifest + ["data.boxed_fraction=0.5"]
    cfg = load_config(packaged, over)
    line = apply_split_policy(cfg.data, packaged, over)
    assert cfg.data.boxed_fraction == 0.5 and "from the command line" in line
    own = tmp_path / "mine.yaml"
    shutil.copy(packaged, own)
    own.write_text(own.read_text().replace("boxed_fraction: 0.2 ", "boxed_fraction: 0.3 "))
    cfg = load_config(own, manifest)
    line = apply_split_policy(cfg.data, own, manifest)
    assert cfg.data.boxed_fraction == 0.3 and "mine.yaml" in line
    cfg = load_config(ROOT / "configs/supervised_detector.yaml", [])  # the checkout's twin, synthetic world
    assert apply_split_policy(cfg.data, ROOT / "configs/supervised_detector.yaml", []) is None
    assert cfg.data.boxed_fraction == 0.2
