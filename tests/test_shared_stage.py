"""The shared supervised stage: one checkpoint per key, reused across recipes and run folders;
the supervised baseline is bit-identical to TSD's teacher; pseudo-label collapse is caught."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from cxrdistill.config import validate_config
from cxrdistill.methods.registry import get_method, validate_method_params
from cxrdistill.pseudo.collapse import PseudoLabelCollapse


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from cxrdistill.data.synthetic import make_world

    return make_world(tmp_path_factory.mktemp("stage_world"), n_images=40, image_size=32, seed=5,
                      normal_fraction=0.2)


def _run(world, out, method: str, params: dict | None = None, steps: int = 3, lr: float = 1e-3,
         weak_fraction: float | str = 0.0):
    from cxrdistill.data.study import resolve_data_config
    from cxrdistill.engine.context import RunContext
    from cxrdistill.engine.run_dir import RunDirectory

    cfg = validate_config({
        "data": {"manifest": str(world), "image_size": 32, "boxed_fraction": 0.3, "weak_fraction": weak_fraction,
                 "cache_dir": str(out.parent / "cache")},
        "model": {"kind": "detector", "base_width": 4,
                  "options": {"fpn_channels": 8, "fpn_levels": [3, 4], "head_convs": 1}},
        "train": {"max_steps": steps, "batch_size": 3, "lr": lr, "progress": False, "tensorboard": False,
                  "checkpoint_every": 1},
        "method": {"name": method, "params": {"n_boot": 10, **({} if method in ("mean_teacher", "unbiased_teacher") else
                                                               {"topk_candidates": 50}), **(params or {})}},
        "output_dir": str(out),
    })
    resolve_data_config(cfg.data)
    console = Console(record=True, width=300)
    ctx = RunContext.create(cfg, RunDirectory(cfg.output_dir, min_free_bytes=0), console)
    p = validate_method_params(method, cfg.method.params)
    return get_method(method).run(cfg, p, ctx), console


def _weights(path):
    return torch.load(path, weights_only=True)["modules"]["model"]


def test_second_recipe_at_the_same_key_trains_no_teacher_and_a_changed_key_retrains(world, tmp_path, monkeypatch,
                                                                                   fits):
    monkeypatch.setenv("CXRDISTILL_STAGE_STORE", str(tmp_path / "store"))
    base, _ = _run(world, tmp_path / "sup", "supervised_detector", {"topk_candidates": 50, "predict_batch_size": 32})
    assert fits == ["supervised"]
    [entry] = list((tmp_path / "store" / "detector").iterdir())
    assert json.loads((entry / "key.json").read_text())["steps"] == 3
    # TSD in another run folder: its teacher is loaded from the store, only the student trains
    fits.clear()
    metrics, _ = _run(world, tmp_path / "tsd", "tsd", {"pseudo_score_thresh": 0.01, "store_score_thresh": 0.001,
                                                       "pseudo": {"min_image_fraction": 0.0}})
    assert fits == ["vision_gen1"]
    marker = json.loads((tmp_path / "tsd" / "checkpoints" / "supervised" / "stage_key.json").read_text())
    assert marker["key"] == entry.name and marker["source"] == "store"
    # the supervised row is the teacher: same metrics, same prediction file, byte for byte
    assert metrics["teacher/mAP@0.5"] == pytest.approx(base["mAP@0.5"], abs=1e-9)
    assert (tmp_path / "tsd" / "eval_teacher" / "predictions.json").read_bytes() == \
        (tmp_path / "sup" / "eval" / "predictions.json").read_bytes()
    # a changed key (another learning rate) trains a new teacher, next to the old entry
    fits.clear()
    _run(world, tmp_path / "tsd_lr", "tsd", {"pseudo_score_thresh": 0.01, "pseudo": {"min_image_fraction": 0.0}},
         lr=2e-3)
    assert fits == ["supervised", "vision_gen1"]
    assert len(list((tmp_path / "store" / "detector").iterdir())) == 2
    # the compute-matched control is another key too (max_steps + extra_steps)
    fits.clear()
    _run(world, tmp_path / "long", "supervised_detector", {"extra_steps": 2})
    assert fits == ["supervised"]
    assert json.loads((tmp_path / "long" / "checkpoints" / "supervised" / "stage_key.json").read_text())["steps"] == 5


def test_supervised_row_is_bit_identical_to_the_teacher_trained_separately(world, tmp_path, monkeypatch, fits):
    """Without a store both recipes train their own supervised stage: the weights are the same bits."""
    monkeypatch.setenv("CXRDISTILL_STAGE_STORE", "off")
    base, _ = _run(world, tmp_path / "sup", "supervised_detector", {"predict_batch_size": 32})
    metrics, _ = _run(world, tmp_path / "tsd", "tsd", {"pseudo_score_thresh": 0.01,
                                                       "pseudo": {"min_image_fraction": 0.0}})
    assert fits == ["supervised", "supervised", "vision_gen1"]
    a = _weights(tmp_path / "sup" / "checkpoints" / "supervised" / "last.pt")
    b = _weights(tmp_path / "tsd" / "checkpoints" / "supervised" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics["teacher/mAP@0.5"] == base["mAP@0.5"]


def test_a_recipe_that_also_reads_image_labels_shares_the_box_trained_teacher(world, tmp_path, monkeypatch, fits):
    """The boxed images do not depend on data.weak_fraction (`make_semi_split`), so the detector stage
    of a boxes + image-labels run (OXnet's base, `weak_fraction=rest`) is the same model as the
    supervised row's: trained with the store off it is the same bits, and with the store on it is
    loaded, not trained again."""
    monkeypatch.setenv("CXRDISTILL_STAGE_STORE", "off")
    _run(world, tmp_path / "sup", "supervised_detector", {"predict_batch_size": 32})
    _run(world, tmp_path / "weak", "supervised_detector", {"predict_batch_size": 32}, weak_fraction="rest")
    a = _weights(tmp_path / "sup" / "checkpoints" / "supervised" / "last.pt")
    b = _weights(tmp_path / "weak" / "checkpoints" / "supervised" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.setenv("CXRDISTILL_STAGE_STORE", str(tmp_path / "store"))
    fits.clear()
    _run(world, tmp_path / "sup2", "supervised_detector", {"predict_batch_size": 32})
    _run(world, tmp_path / "weak2", "supervised_detector", {"predict_batch_size": 32}, weak_fraction="rest")
    assert fits == ["supervised"]  # the second run loaded the first one's stage
    keys = {json.loads((tmp_path / d / "checkpoints" / "supervised" / "stage_key.json").read_text())["key"]
            for d in ("sup2", "weak2")}
    assert len(keys) == 1


def test_a_teacher_that_passes_no_box_is_reported_and_can_stop_the_run(world, tmp_path, monkeypatch):
    """An untrained teacher (0 steps: every score near the 0.01 prior) keeps no box at τ 0.5."""
    monkeypatch.setenv("CXRDISTILL_STAGE_STORE", "off")
    metrics, console = _run(world, tmp_path / "warn", "tsd", {"teacher_steps": 0, "student_steps": 1,
                                                              "pseudo_score_thresh": 0.5,
                                                              "store_score_thresh": 0.0})
    text = " ".join(console.export_text().split())  # undo the console's line wrapping
    assert "pseudo-labels collapsed" in text and "0 of" in text
    saved = json.loads((tmp_path / "warn" / "pseudo_selection.json").read_text())
    labeled = saved["collapse"]["labeled_classes"]
    assert labeled and all(f"'{name}'" in text for name in labeled)  # names every empty labeled class
    assert saved["collapse"]["collapsed"] and sum(saved["kept_per_class"].values()) == 0
    assert all(f"{name} 0" in text for name in saved["kept_per_class"])  # and the per-class counts
    assert metrics["pseudo/collapsed"] == 1.0
    with pytest.raises(PseudoLabelCollapse, match=r"precision@0\.8") as err:
        _run(world, tmp_path / "stop", "tsd", {"teacher_steps": 0, "student_steps": 1, "pseudo_score_thresh": 0.5,
                                               "store_score_thresh": 0.0, "pseudo": {"on_collapse": "stop"}})
    assert labeled[0] in str(err.value) and "unlabeled images" in str(err.value)
    assert not (tmp_path / "stop" / "checkpoints" / "vision_gen1").exists()  # stopped before the student


def test_study_table_shows_delta_vs_own_teacher_and_the_baseline_is_that_teacher(world, tmp_path, monkeypatch):
    import yaml

    from cxrdistill.study.runner import run_study
    from cxrdistill.study.spec import StudySpec

    monkeypatch.setenv("CXRDISTILL_STAGE_STORE", str(tmp_path / "store"))
    base = {"data": {"manifest": str(world), "image_size": 32, "cache_dir": str(tmp_path / "cache")},
            "model": {"kind": "detector", "base_width": 4,
                      "options": {"fpn_channels": 8, "fpn_levels": [3, 4], "head_convs": 1}},
            "train": {"max_steps": 3, "batch_size": 3, "progress": False, "tensorboard": False}}
    configs = {}
    for name, params in {"supervised_detector": {"topk_candidates": 50, "predict_batch_size": 32},
                         "tsd": {"topk_candidates": 50, "pseudo_score_thresh": 0.01,
                                 "pseudo": {"min_image_fraction": 0.0}}}.items():
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({**base, "method": {"name": name, "params": {"n_boot": 10, **params}}}))
    spec = StudySpec(name="tiny", output_dir=tmp_path / "study", fractions=[0.3], seeds=[0], n_boot=20,
                     recipes={"supervised": {"config": configs["supervised_detector"]},
                              "tsd": {"config": configs["tsd"]}})
    result = run_study(spec, tmp_path / "study", Console(record=True), report=True)
    rows = {r["recipe"]: r["fractions"]["f0.3"] for r in result.table["rows"]}
    own, vs_base = rows["tsd"]["vs_teacher"], rows["tsd"]["vs_baseline"]
    # the own teacher is the baseline's checkpoint: both comparisons are the same numbers
    assert own["a"] == vs_base["a"] and own["diff"] == vs_base["diff"] and "vs_teacher" not in rows["supervised"]
    assert "vs own teacher" in result.table_path.read_text()
    assert "vs own teacher" in result.report_path.read_text()



@pytest.mark.parametrize("method,selection", [("stac", "precision@0.8"), ("unbiased_teacher", "topk_per_class"),
                                              ("tsd", "topk_per_class")])
def test_every_detection_recipe_takes_a_pseudo_selection_and_reports_delta_vs_own_teacher(world, tmp_path,
                                                                                         monkeypatch, method,
                                                                                         selection):
    monkeypatch.setenv("CXRDISTILL_STAGE_STORE", str(tmp_path / "store"))
    params = {"pseudo": {"selection": selection, "min_image_fraction": 0.0, "min_val_boxes": 1}}
    if method == "tsd":
        params["store_score_thresh"] = 0.0
    metrics, _ = _run(world, tmp_path / method, method, params, steps=4)
    saved = json.loads((tmp_path / method / "pseudo_selection.json").read_text())
    assert saved["selection"] == selection and set(saved["thresholds"]) == set(saved["kept_per_class"])
    for name, record in saved["per_class"].items():
        assert record["kept_unlabeled"] == saved["kept_per_class"][name]
    assert metrics["delta_teacher/mAP@0.5"] == pytest.approx(metrics["mAP@0.5"] - metrics["teacher/mAP@0.5"],
                                                             abs=1e-6)
    assert (tmp_path / method / "eval_teacher" / "predictions.json").is_file()


def test_the_stage_key_follows_the_bytes_of_local_pretrained_weights_not_their_path(tmp_path):
    """Two runs whose `model.pretrained` names the same run folder share a stage only while that folder
    holds the same weights: re-running the pretraining in place must not hand on the old stage."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from cxrdistill.config import RunConfig
    from cxrdistill.methods.kit import stage_key

    folder = tmp_path / "pretrain_run"
    folder.mkdir()
    save_file({"conv1.weight": torch.zeros(2, 1, 3, 3)}, str(folder / "model.safetensors"))
    cfg = RunConfig.model_validate({"model": {"kind": "detector", "pretrained": str(folder)},
                                   "method": {"name": "supervised_detector"}})
    ctx = SimpleNamespace(cfg=cfg, world_size=1)
    first, payload = stage_key(ctx, "detector", 10, "flip", "train")
    assert len(payload["pretrained_sha256"]) == 64
    assert stage_key(ctx, "detector", 10, "flip", "train")[0] == first
    save_file({"conv1.weight": torch.ones(2, 1, 3, 3)}, str(folder / "model.safetensors"))
    assert stage_key(ctx, "detector", 10, "flip", "train")[0] != first
    plain = SimpleNamespace(cfg=RunConfig.model_validate({"method": {"name": "supervised_detector"}}), world_size=1)
    assert "pretrained_sha256" not in stage_key(plain, "detector", 10, "flip", "train")[1]  # keys of runs without weights unchanged
