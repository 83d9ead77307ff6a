"""Table I (`eval.table_i`) and the per-stage task scores (`eval.task_scores`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console

from cxrdistill.eval.classification import bootstrap_auroc, classification_summary
from cxrdistill.eval.table_i import format_table_markdown, print_table, table_metrics, table_one


def _result(stage: str, truth: np.ndarray, scores: np.ndarray) -> dict:
    summary = classification_summary(bootstrap_auroc(truth, scores, n_boot=50, seed=0), ["a", "b"])
    return {"stage": stage, "summary": summary, "scores": scores, "truth": truth}


def test_table_one_rows_deltas_and_flat_metrics():
    rng = np.random.default_rng(0)
    truth = np.stack([np.arange(40) % 2, (np.arange(40) // 2) % 2], axis=1).astype(np.float32)
    noisy = truth + rng.normal(0, 1.0, truth.shape)
    perfect = truth.astype(float)
    table = table_one({"teacher": _result("classifier", truth, noisy),
                       "student1": _result("student1_finetune", truth, perfect)},
                      split="test", tta=False, task="multi_label", kappa=0.75, n_boot=50)
    teacher, student = table["rows"]
    assert "minus_teacher" not in teacher and student["macro_AUROC"] == 1.0
    assert student["minus_teacher"] == pytest.approx(1.0 - teacher["macro_AUROC"])
    assert student["minus_teacher_CI95"][0] <= student["minus_teacher"] <= student["minus_teacher_CI95"][1]
    flat = table_metrics(table)
    assert flat["student1/macro_AUROC"] == 1.0 and flat["teacher/macro_AUROC"] == teacher["macro_AUROC"]
    assert flat["student1/delta_teacher/macro_AUROC"] == student["minus_teacher"]
    assert not any(k.startswith("teacher/delta_teacher") for k in flat)
    json.dumps(table)  # JSON-ready
    md = format_table_markdown(table).splitlines()
    assert md[0].startswith("| model | stage |") and len(md) == 4
    assert md[2].startswith("| teacher | classifier | ") and md[2].endswith("| — |")
    assert md[3].startswith("| student1 | student1_finetune | 1.000 [1.000, 1.000] | +")
    console = Console(record=True, width=200)
    print_table(console, table)
    text = console.export_text()
    assert "Table I" in text and "student1_finetune" in text and "+0.1" in text


def test_undefined_auroc_is_none_in_the_table_and_nan_in_the_flat_metrics():
    truth = np.zeros((6, 2), np.float32)  # no positive: AUROC undefined
    scores = np.linspace(0, 1, 12).reshape(6, 2)
    table = table_one({"teacher": _result("classifier", truth, scores), "student1": _result("s", truth, scores)},
                      split="test", tta=True, task="multi_label", kappa=0.5, n_boot=20)
    assert table["rows"][1]["minus_teacher"] is None
    flat = table_metrics(table)
    assert math.isnan(flat["teacher/macro_AUROC"]) and math.isnan(flat["student1/delta_teacher/macro_AUROC"])
    assert "n/a" in format_table_markdown(table)


def test_score_task_writes_scores_and_reuses_them(tmp_path, monkeypatch):
    from cxrdistill.data.study import StudyData
    from cxrdistill.data.synthetic import make_world
    from cxrdistill.data.targets import ClassificationTask
    from cxrdistill.eval import task_scores

    data = StudyData.open(make_world(tmp_path / "w", n_images=12, image_size=32, seed=1), image_size=32,
                          cache_dir=tmp_path / "cache")
    held_out = data.dataset(["train", "val", "test"])
    task = ClassificationTask(data.class_names, "any_finding")
    predict = lambda x: torch.stack([1 - x.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3))], dim=1)
    first = task_scores.score_task(predict, held_out, task, tmp_path / "eval", stage="s", split="all", reuse=False,
                                   tta=False, crop_fraction=1.0, batch_size=5, n_boot=20)
    assert first["scores"].shape == (len(held_out), 2) and first["image_ids"] == [im.id for im in held_out.images]
    abnormal = [float(data.manifest.image_labels(i).any()) for i in first["image_ids"]]
    assert first["truth"][:, 1].tolist() == abnormal and (first["truth"].sum(1) == 1).all()
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["stage"] == "s"
    monkeypatch.setattr(task_scores, "predict_dataset", lambda *a, **k: pytest.fail("predicted again"))
    again = task_scores.score_task(predict, held_out, task, tmp_path / "eval", stage="s", split="all", reuse=True,
                                   tta=False, crop_fraction=1.0, batch_size=5, n_boot=20)
    np.testing.assert_array_equal(again["scores"], first["scores"])
    assert again["summary"] == first["summary"]
