"""CEIRD recipe: the pseudo-label paths (SA-NMS, RPDLR, APCLR), the co-evolution hand-over,
rebirth of the students, and resume without re-predicting stored pseudo-labels."""

from __future__ import annotations

import json

import pytest
import torch

import cxrdistill.methods.ceird as ceird
import cxrdistill.methods.offline as offline
import cxrdistill.methods.tsd as tsd
from cxrdistill.config import validate_config
from cxrdistill.errors import ConfigError
from cxrdistill.methods.registry import get_method, validate_method_params
from cxrdistill.pseudo.store import PseudoLabelWriter

NAMES = ["a", "b", "c"]

# the final model's keys of a detection evaluation (`kit.headline`), the same in every recipe
DETECTION_HEADLINE = {"mAP", "mAP@0.25", "mAP@0.5", "mAP@0.75", "AP_small", "AP_medium", "AP_large", "AR@100", "froc",
                      "macro_AUROC", "macro_AUROC_ci_low", "macro_AUROC_ci_high"}


def dets(boxes, scores, labels) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.long)}


# ------------------------------------------------------------------------------ pseudo-label paths


def test_rpdlr_removes_exactly_the_classes_absent_from_the_report_prediction():
    teacher = [dets([[0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 9, 9]], [0.9, 0.8, 0.7], [0, 1, 2]),
               dets([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.6], [1, 1])]
    present = {7: torch.tensor([True, False, True]), 8: torch.tensor([False, False, False])}
    refine = ceird.CeirdPseudoLabels(NAMES, sa_nms=False, sa_nms_iou=0.5, sa_nms_score_thresh=0.5, present=present)
    assert not refine.needs_student
    out, counts = refine(teacher, None, [7, 8])
    assert out[0]["labels"].tolist() == [0, 2] and out[0]["boxes"].tolist() == [[0, 0, 10, 10], [5, 5, 9, 9]]
    assert out[1]["labels"].numel() == 0
    assert counts == {"teacher": {"a": 1, "b": 3, "c": 1}, "rpdlr": {"a": 1, "b": 0, "c": 1}}
    # an image without a report (absent from `present`) keeps its boxes; rpdlr off keeps everything
    kept, _ = refine(teacher[:1], None, [99])
    assert kept[0]["labels"].tolist() == [0, 1, 2]
    off = ceird.CeirdPseudoLabels(NAMES, False, 0.5, 0.5, present=None)
    assert [d["labels"].tolist() for d in off(teacher, None, [7, 8])[0]] == [[0, 1, 2], [1, 1]]


def test_sa_nms_pools_teacher_and_student_before_rpdlr():
    teacher = [dets([[0, 0, 10, 10]], [0.6], [0])]
    student = [dets([[1, 0, 11, 10], [30, 30, 40, 40], [50, 50, 60, 60], [0, 0, 5, 5]], [0.9, 0.8, 0.7, 0.3], [0, 1, 2, 0])]
    refine = ceird.CeirdPseudoLabels(NAMES, sa_nms=True, sa_nms_iou=0.5, sa_nms_score_thresh=0.5,
                                     present={1: torch.tensor([True, True, False])})
    assert refine.needs_student
    out, counts = refine(teacher, student, [1])
    # the confident student box replaces the overlapping teacher box; its new class-1 box joins;
    # the class-2 box is dropped by RPDLR; the 0.3 student box never entered SA-NMS
    assert out[0]["boxes"].tolist() == [[1, 0, 11, 10], [30, 30, 40, 40]]
    assert out[0]["source"].tolist() == [1, 1]
    assert counts["teacher"] == {"a": 1, "b": 0, "c": 0}
    assert counts["sa_nms"] == {"a": 1, "b": 1, "c": 1}
    assert counts["rpdlr"] == {"a": 1, "b": 1, "c": 0}
    with pytest.raises(ValueError, match="student"):
        refine(teacher, None, [1])


def test_apclr_keeps_only_report_pseudo_labels_the_vision_model_detects():
    probs = torch.tensor([[0.9, 0.7, 0.1], [0.6, 0.2, 0.8]])
    assert report_targets_equal(ceird.report_pseudo_targets(probs, None, 0.5), [[1, 1, 0], [1, 0, 1]])
    reports = ceird.ReportSets([], None, [4, 5], ["x", "y"], [])
    vision = {4: dets([[0, 0, 5, 5], [1, 1, 6, 6]], [0.9, 0.4], [0, 1]),  # class 1 below the APCLR threshold
              5: dets([[0, 0, 5, 5], [0, 0, 5, 5]], [0.8, 0.7], [1, 2])}
    detected = ceird.detected_classes(reports, vision, 3, thresh=0.5)
    assert detected.tolist() == [[True, False, False], [False, True, True]]
    refined = ceird.report_pseudo_targets(probs, detected, 0.5)
    # removed exactly the report positives not detected: (0, b) and (1, a); negatives never become positive
    assert report_targets_equal(refined, [[1, 0, 0], [0, 0, 1]])


def report_targets_equal(t: torch.Tensor, expected) -> bool:
    return t.tolist() == [[float(v) for v in row] for row in expected]


def test_params_default_to_the_paper_and_reject_typos():
    params = validate_method_params("ceird", {})
    assert (params.generations, params.labeled_ratio, params.unlabeled_ratio) == (2, 2, 1)
    assert params.rpdlr and params.apclr and params.sa_nms and params.rpdlr_source == "report_model"
    with pytest.raises(ConfigError, match="sa_nmss"):
        validate_method_params("ceird", {"sa_nmss": False})
    assert get_method("tsd").params_cls is tsd.TsdParams
    assert offline.batch_split(6, 2, 1) == (4, 2) and offline.batch_split(3, 2, 1) == (2, 1)


# ------------------------------------------------------------------------------ tiny end-to-end runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from cxrdistill.data.synthetic import make_world

    return make_world(tmp_path_factory.mktemp("ceird_world"), n_images=40, image_size=32, seed=3,
                      normal_fraction=0.2)


def _ctx(world, out, **params):
    from cxrdistill.data.study import resolve_data_config
    from cxrdistill.engine.context import RunContext
    from cxrdistill.engine.run_dir import RunDirectory

    cfg = validate_config({
        "data": {"manifest": str(world), "image_size": 32, "boxed_fraction": 0.3, "cache_dir": str(out.parent / "cache")},
        "model": {"kind": "detector", "base_width": 4,
                  "options": {"fpn_channels": 8, "fpn_levels": [3, 4], "head_convs": 1}},
        "train": {"max_steps": 3, "batch_size": 3, "progress": False, "tensorboard": False, "checkpoint_every": 1},
        "method": {"name": "ceird", "params": {"topk_candidates": 50, "n_boot": 10, "predict_batch_size": 2,
                                               "sa_nms_score_thresh": 0.01, "pseudo_score_thresh": 0.01,
                                               "apclr_score_thresh": 0.01, **params}},
        "output_dir": str(out),
    })
    resolve_data_config(cfg.data)
    params_obj = validate_method_params("ceird", cfg.method.params)
    return cfg, params_obj, RunContext.create(cfg, RunDirectory(cfg.output_dir, min_free_bytes=0))


def test_generations_rebirth_students_and_hand_the_frozen_student_on(world, tmp_path, monkeypatch):
    built, distilled, stored, sa_calls = [], [], [], []
    real_build, real_distill, real_store = ceird.build_detector, ceird.distill_detector, ceird.stored_detections
    real_view, real_sa = offline.random_view, ceird.self_adaptive_nms_batch
    views = []

    def build(model_cfg, num_classes, seed):
        model = real_build(model_cfg, num_classes, seed)
        built.append((seed, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    def distill(ctx, stage, student, sets, pseudo, thresholds, schedule, refiner, seed):
        distilled.append({"stage": stage, "student": student, "pseudo": pseudo, "refiner": refiner,
                          "init": {k: v.clone() for k, v in student.state_dict().items()}})
        return real_distill(ctx, stage, student, sets, pseudo, thresholds, schedule, refiner, seed)

    def store(ctx, model, sets, generation, **kwargs):
        result = real_store(ctx, model, sets, generation, **kwargs)
        stored.append({"generation": generation, "model": model, "result": result,
                       "weights": {k: v.clone() for k, v in model.state_dict().items()}})
        return result

    def view(*args, **kwargs):
        out = real_view(*args, **kwargs)
        views.append(out)
        return out

    def sa(teacher, student, iou, thresh):
        # the student predictions handed to SA-NMS are the current student's, on this batch's view
        model = distilled[-1]["student"]
        unlabeled = [i for i in range(views[-1].images.shape[0])][-len(teacher):]
        with torch.no_grad():
            expected = model.decode(offline.output_rows(model(views[-1].images), torch.tensor(unlabeled)),
                                    score_thresh=0.05, topk_candidates=50)
        for got, want in zip(student, expected):
            assert torch.allclose(got["scores"], want["scores"]) and torch.equal(got["labels"], want["labels"])
        sa_calls.append(len(teacher))
        return real_sa(teacher, student, iou, thresh)

    monkeypatch.setattr(ceird, "build_detector", build)
    monkeypatch.setattr(ceird, "distill_detector", distill)
    monkeypatch.setattr(ceird, "stored_detections", store)
    monkeypatch.setattr(offline, "random_view", view)
    monkeypatch.setattr(ceird, "self_adaptive_nms_batch", sa)
    cfg, params, ctx = _ctx(world, tmp_path / "run")
    metrics = ceird.run(cfg, params, ctx)

    assert [d["stage"] for d in distilled] == ["vision_gen1", "vision_gen2"]
    assert sa_calls and all(n == 1 for n in sa_calls)  # 3 per batch at 2:1 -> one unlabeled image
    # rebirth: generation 2's student starts from new random weights, not from generation 1's
    init1, init2 = distilled[0]["init"], distilled[1]["init"]
    trained1 = stored[1]["weights"]
    conv = "backbone.stem.0.weight" if "backbone.stem.0.weight" in init1 else next(iter(init1))
    assert not torch.equal(init1[conv], init2[conv]) and not torch.equal(trained1[conv], init2[conv])
    assert [s for s, _ in built[-2:]] == [cfg.train.seed + 1, cfg.train.seed + 2]
    # hand-over: the frozen student 1 is the teacher of generation 2 (its stored detections)
    assert [s["generation"] for s in stored] == [0, 1]
    assert stored[1]["model"] is distilled[0]["student"]
    assert distilled[1]["pseudo"] is stored[1]["result"] and distilled[0]["pseudo"] is stored[0]["result"]
    # RPDLR in generation k uses the report student k's predictions on the paired reports
    r2 = ceird.PseudoLabelStore(ctx.run_dir.path / "pseudo" / "report", 2).read()
    present = distilled[1]["refiner"].present
    assert present.keys() == r2.keys()
    assert all(torch.equal(present[i], r2[i] >= params.report_thresh) for i in r2)

    summary = json.loads((tmp_path / "run" / "ceird_summary.json").read_text())
    assert [g["generation"] for g in summary["generations"]] == [0, 1, 2]
    for k in range(3):
        assert set(summary["generations"][k]["vision"]) == DETECTION_HEADLINE
        assert 0.0 <= summary["generations"][k]["report"]["macro_AUROC"] <= 1.0
        assert f"vision_gen{k}/mAP@0.5" in metrics and f"report_gen{k}/macro_AUROC" in metrics
        # the report probabilities were calibrated (platt, out-of-fold) and their ECE recorded
        report = summary["generations"][k]["report"]
        assert 0.0 <= report["ECE"] <= 1.0 and 0.0 <= report["ECE_labeled_after"] <= 1.0
        assert (tmp_path / "run" / "checkpoints" / f"report_gen{k}" / "report_model" / "calibration.json").is_file()
    counts = json.loads((tmp_path / "run" / "pseudo_counts.json").read_text())
    per_batch = counts["generation_2"]["vision_pseudo_boxes_per_batch"]
    assert set(per_batch) == {"teacher", "sa_nms", "rpdlr"}
    assert all(per_batch["rpdlr"][c] <= per_batch["sa_nms"][c] for c in per_batch["rpdlr"])
    assert (tmp_path / "run" / "eval" / "metrics.json").is_file()

    # resume: generation 2's vision student was killed mid-way, and part of the stored teacher
    # detections of generation 1 was lost with it: the rerun trains only that stage, predicts only
    # the missing images, and reads every other pseudo-label from the store
    stage2 = tmp_path / "run" / "checkpoints" / "vision_gen2"
    (stage2 / "done.json").unlink()
    gen1 = ctx.run_dir.path / "pseudo" / "vision" / "generation_001"
    (gen1 / "COMPLETE.json").unlink()
    chunks = sorted(gen1.glob("chunk_*.npz"))
    lost = set(ceird.PseudoLabelStore._read_chunk(chunks[-1], ("image_ids",))["image_ids"].tolist())
    chunks[-1].unlink()
    added, fits = [], []
    real_add = PseudoLabelWriter.add
    monkeypatch.setattr(PseudoLabelWriter, "add", lambda self, i, r: added.append(i) or real_add(self, i, r))
    from cxrdistill.engine.loop import Trainer

    real_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: fits.append((self.stage, self.is_done()))
                        or real_fit(self, *a, **k))
    monkeypatch.setattr(ceird.TfidfReportClassifier, "fit", lambda *a, **k: pytest.fail("report model refitted"))
    distilled.clear()
    cfg, params, ctx = _ctx(world, tmp_path / "run")
    again = ceird.run(cfg, params, ctx)
    assert set(added) == lost  # only the lost chunk is predicted again
    assert [s for s, done in fits if not done] == ["vision_gen2"]
    assert again["vision_gen1/mAP@0.5"] == metrics["vision_gen1/mAP@0.5"]


def test_tsd_recipe_runs_teacher_then_student(world, tmp_path):
    cfg, _, ctx = _ctx(world, tmp_path / "tsd")
    cfg.method.name = "tsd"
    params = tsd.TsdParams(topk_candidates=50, n_boot=10, pseudo_score_thresh=0.01, store_score_thresh=0.001)
    metrics = tsd.run(cfg, params, ctx)
    keys = {f"mAP@{t}" for t in ("0.25", "0.5", "0.75")}
    deltas = {f"delta_teacher/{k}{s}" for k in keys for s in ("", "_ci_low", "_ci_high", "_p_boot")}
    assert set(metrics) == DETECTION_HEADLINE | {f"{m}/{k}" for m in ("teacher", "student") for k in DETECTION_HEADLINE} \
        | deltas | {"pseudo/collapsed"}
    for k in keys:  # Δ vs own teacher: student − teacher on the same test images, CI around it
        assert metrics[f"delta_teacher/{k}"] == pytest.approx(metrics[k] - metrics[f"teacher/{k}"], abs=1e-6)
    saved = json.loads((tmp_path / "tsd" / "teacher_comparison.json").read_text())
    assert saved["delta_teacher/mAP@0.5"] == pytest.approx(metrics["delta_teacher/mAP@0.5"])
    assert all(metrics[k] == metrics[f"student/{k}"] for k in keys)  # the final model is the student
    assert (tmp_path / "tsd" / "model.pt").is_file()
    counts = json.loads((tmp_path / "tsd" / "pseudo_counts.json").read_text())["vision_gen1"]
    assert set(counts) == {"teacher"} and sum(counts["teacher"].values()) > 0
    assert offline.PseudoLabelStore(tmp_path / "tsd" / "pseudo" / "vision", 0).is_complete()
