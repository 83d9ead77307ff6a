"""Every registered recipe runs end to end, tiny (issue 18, item 7).

Each `method.name` of the registry is trained through `cxrdistill.run.run_training` (what
`cxrdistill train` calls) from its packaged config plus the overrides of ``tiny_recipes.py``: a
synthetic world of 24 images at 32 px, 4 steps a stage, width-4 models. The run must finish and
leave what a study reads: ``final_metrics.json`` with the recipe's headline metrics (finite, in
[0, 1]), the ``run.json`` fingerprint of its ``config.yaml``, and for a distillation recipe
``teacher_comparison.json`` (student − own teacher, with a bootstrap CI).

The run is the crash matrix's uninterrupted reference run (``tiny_recipes.shared_run``): trained
once per session, whichever of the two test modules asks first.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_recipes import IMAGE_SIZE, MAX_STAGE_STEPS, N_BOOT, RECIPES, packaged_config, shared_run  # noqa: E402


def _registered() -> list[str]:
    """Every recipe of the package (test modules may register toy recipes too: those are left out)."""
    from cxrdistill.methods.registry import _REGISTRY, available_methods

    available_methods()  # imports every recipe module
    return sorted(m for m, spec in _REGISTRY.items() if spec.run.__module__.startswith("cxrdistill.methods."))


REGISTERED = _registered()

# the final model's headline keys (`kit.headline`), one tuple per kind of evaluation
DETECTION = ("mAP", "mAP@0.25", "mAP@0.5", "mAP@0.75", "AP_small", "AP_medium", "AP_large", "AR@100", "froc",
             "macro_AUROC", "macro_AUROC_ci_low", "macro_AUROC_ci_high")
HEATMAP = (*DETECTION, "modified_froc", "modified_froc_ci_low", "modified_froc_ci_high")  # of the maps' region boxes
CLASSIFICATION = ("macro_AUROC", "macro_AUROC_ci_low", "macro_AUROC_ci_high")
KIND: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("supervised_detector", "supervised_multitask", "mean_teacher", "unbiased_teacher", "soft_teacher",
                     "stac", "tsd", "ceird", "oxnet", "cam"), DETECTION),
    **dict.fromkeys(("supervised_heatmap", "aals"), HEATMAP),
    **dict.fromkeys(("supervised_classifier", "supervised_report", "pi_model", "temporal_ensembling",
                     "teacher_student_cls"), CLASSIFICATION),
}
OXNET_IOUS = ("0.4", "0.45", "0.5", "0.55", "0.6", "0.65", "0.7", "0.75")  # OXnet's own IoU grid
# recipe -> its other stages, each scored like the final model (`<stage>/<same key>`)
STAGES: dict[str, tuple[str, ...]] = {
    "tsd": ("teacher", "student"), "ceird": ("teacher", "vision_gen0", "vision_gen1", "vision_gen2"),
    "stac": ("teacher",), "mean_teacher": ("teacher",), "unbiased_teacher": ("teacher",), "soft_teacher": ("teacher",),
    "oxnet": ("base", "student", "teacher"), "aals": ("pretrain", "student", "teacher"),
    "teacher_student_cls": ("teacher", "intermediate1", "student1", "intermediate2", "student2"),
}


def kind_keys(recipe: str) -> tuple[str, ...]:
    """The final model's keys of `recipe`: its kind's, OXnet's mAP at its IoU grid with a bootstrap CI."""
    if recipe == "oxnet":
        return (*(k for k in DETECTION if not k.startswith("mAP@")), *(f"mAP@{t}" for t in OXNET_IOUS),
                "mAP_ci_low", "mAP_ci_high")
    return KIND[recipe]


# recipe -> its headline metrics in final_metrics.json (probabilities, mAP, FROC: all in [0, 1])
HEADLINE: dict[str, tuple[str, ...]] = {
    recipe: (*kind_keys(recipe), *(f"{stage}/{key}" for stage in STAGES.get(recipe, ()) for key in kind_keys(recipe)))
    for recipe in KIND}
HEADLINE["ceird"] += ("report_gen2/macro_AUROC", "report_gen2/macro_AUROC_ci_low", "report_gen2/macro_AUROC_ci_high")
# recipes that compare the final model with their own teacher on the same test images
TEACHER_COMPARISON = {"tsd", "ceird", "stac", "mean_teacher", "unbiased_teacher", "soft_teacher"}
CLASSIFIER_TEACHER_COMPARISON = {"teacher_student_cls"}  # Δ macro AUROC vs the shared classifier stage
# metrics that are legitimately NaN (``null`` in the JSON) on a tiny test split (no truth box in that size range)
MAY_BE_NAN = ("AP_small", "AP_medium", "AP_large")


def test_the_registry_lists_the_known_recipes_and_every_one_has_a_tiny_config():
    known = {"supervised_detector", "supervised_multitask", "supervised_heatmap", "supervised_classifier",
             "supervised_report", "mean_teacher", "unbiased_teacher", "soft_teacher", "stac", "tsd", "ceird",
             "oxnet", "aals", "cam", "pi_model", "temporal_ensembling", "teacher_student_cls"}
    assert known <= set(REGISTERED)
    missing = sorted(set(REGISTERED) - set(RECIPES))
    assert not missing, f"add a tiny config to tests/tiny_recipes.py for: {missing}"
    assert not sorted(set(REGISTERED) - set(HEADLINE)), "add the recipe's headline metrics to HEADLINE"
    for name in REGISTERED:
        assert packaged_config(name).is_file(), f"{name}: no packaged config {packaged_config(name)}"


@pytest.mark.parametrize("recipe", REGISTERED)
def test_recipe_runs_end_to_end_and_writes_its_final_metrics(tiny_runs_root, recipe):
    from cxrdistill.config import load_config
    from cxrdistill.engine.run_dir import run_fingerprint

    run = shared_run(tiny_runs_root, recipe)

    # the run was tiny: every stage that took optimizer steps took a handful
    for done in sorted((run / "checkpoints").glob("*/done.json")):
        steps = json.loads(done.read_text())["max_steps"]
        assert 0 < steps <= MAX_STAGE_STEPS, f"{done.parent.name}: {steps} steps (not tiny)"

    # config.yaml names what the run read; run.json is its fingerprint (what resume compares)
    cfg = load_config(run / "config.yaml")
    assert cfg.method.name == recipe and cfg.data.image_size == IMAGE_SIZE
    assert cfg.method.params["n_boot"] == N_BOOT
    fingerprint = json.loads((run / "run.json").read_text())
    assert fingerprint == json.loads(json.dumps(run_fingerprint(cfg)))

    metrics = json.loads((run / "final_metrics.json").read_text())
    assert isinstance(metrics, dict) and metrics
    for key, value in metrics.items():
        if value is None and key.endswith(MAY_BE_NAN):
            continue  # NaN, written as null (strict JSON)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}: {value!r}"
        assert math.isfinite(value), f"{key}: {value}"
    for key in HEADLINE[recipe]:
        assert key in metrics, f"headline metric {key} missing from final_metrics.json: {sorted(metrics)}"
        if metrics[key] is None and key.endswith(MAY_BE_NAN):
            continue
        assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0, f"{key}: {metrics[key]}"
    for low, high in [(k, k.replace("_ci_low", "_ci_high")) for k in metrics if k.endswith("_ci_low")]:
        assert metrics[low] <= metrics[high], f"{low} > {high}"
    # the final model is unprefixed and has exactly its kind's keys; every other stage the same ones
    assert {k for k in metrics if "/" not in k} == set(kind_keys(recipe)), sorted(metrics)
    for stage in STAGES.get(recipe, ()):
        assert {k.split("/", 1)[1] for k in metrics if k.startswith(f"{stage}/")} >= set(kind_keys(recipe)), stage

    comparison = run / "teacher_comparison.json"
    assert comparison.is_file() == (recipe in TEACHER_COMPARISON | CLASSIFIER_TEACHER_COMPARISON)
    if recipe in CLASSIFIER_TEACHER_COMPARISON:
        saved = json.loads(comparison.read_text())
        assert saved["teacher_source"] == "trained"
        delta, low, high = (saved[f"delta_teacher/macro_AUROC{s}"] for s in ("", "_ci_low", "_ci_high"))
        assert all(math.isfinite(v) for v in (delta, low, high)) and low <= high and -1.0 <= delta <= 1.0
        assert metrics["delta_teacher/macro_AUROC"] == pytest.approx(delta)
    if recipe in TEACHER_COMPARISON:
        saved = json.loads(comparison.read_text())
        assert saved["teacher_source"] == "trained"  # the stage store is off: its own teacher stage
        for iou in ("0.25", "0.5", "0.75"):
            delta, low, high = (saved[f"delta_teacher/mAP@{iou}{s}"] for s in ("", "_ci_low", "_ci_high"))
            assert all(math.isfinite(v) for v in (delta, low, high)) and low <= high
            # the student and teacher mAP it was taken from; final_metrics.json carries the same Δ
            assert -1.0 <= delta <= 1.0 and metrics[f"delta_teacher/mAP@{iou}"] == pytest.approx(delta)
            assert 0.0 <= saved[f"teacher/mAP@{iou}"] <= 1.0


@pytest.mark.parametrize("kind", ["detection", "heat map", "classification"])
def test_recipes_scored_on_the_same_evaluation_write_the_same_headline_keys(tiny_runs_root, kind):
    """One naming (`kit.headline`): the final model's keys of every recipe of a kind are its
    supervised baseline's, and each other stage repeats them under ``<stage>/``."""
    baseline = {"detection": "supervised_detector", "heat map": "supervised_heatmap",
                "classification": "supervised_classifier"}[kind]
    recipes = [r for r in REGISTERED if KIND[r] is KIND[baseline]]
    assert len(recipes) >= 2
    written = {r: json.loads((shared_run(tiny_runs_root, r) / "final_metrics.json").read_text()) for r in recipes}
    final = {r: {k for k in m if "/" not in k} for r, m in written.items()}
    reference = final[baseline]
    assert reference == set(KIND[baseline])
    for recipe in recipes:
        if recipe == "oxnet":  # the same keys, its mAP at IoU 0.4:0.05:0.75 and with a bootstrap CI
            assert {k for k in final[recipe] if not k.startswith("mAP")} == \
                {k for k in reference if not k.startswith("mAP")}
            assert {k for k in final[recipe] if k.startswith("mAP")} == \
                {"mAP", "mAP_ci_low", "mAP_ci_high", *(f"mAP@{t}" for t in OXNET_IOUS)}
            continue
        assert final[recipe] == reference, f"{recipe}: {sorted(final[recipe] ^ reference)}"
        for stage in STAGES.get(recipe, ()):
            keys = {k.split("/", 1)[1] for k in written[recipe] if k.startswith(f"{stage}/")}
            assert keys >= reference, f"{recipe} {stage}/: lacks {sorted(reference - keys)}"


PSEUDO_BOXES = {"tsd": "offline", "stac": "online", "ceird": "offline", "unbiased_teacher": "online",
                "soft_teacher": "online", "oxnet": "online"}


@pytest.mark.parametrize("recipe", sorted(PSEUDO_BOXES) + ["mean_teacher", "supervised_detector"])
def test_every_pseudo_box_recipe_leaves_its_pseudo_label_counts_for_the_study_table(tiny_runs_root, recipe):
    """What the study table shows beside Δ vs own teacher: boxes per unlabeled image, from the run folder
    (offline: pseudo_selection.json; online: the logged per-step rate), none for soft-target recipes."""
    import csv

    from cxrdistill.study.pseudo_counts import pseudo_label_summary

    run = shared_run(tiny_runs_root, recipe)
    summary = pseudo_label_summary(run)
    if recipe not in PSEUDO_BOXES:
        assert summary is None
        return
    assert summary is not None and summary["source"] == PSEUDO_BOXES[recipe], summary
    assert summary["boxes_per_image"] >= 0 and sum(summary["per_class"].values()) == pytest.approx(summary["boxes_per_image"])
    if summary["source"] == "offline":
        name = "pseudo_selection.json" if recipe == "tsd" else "pseudo_selection_gen2.json"  # CEIRD: the last generation
        selection = json.loads((run / name).read_text())
        n = selection["collapse"]["n_images"]
        assert summary["boxes_per_image"] == pytest.approx(sum(selection["kept_per_class"].values()) / n)
    else:
        with (run / "metrics.csv").open() as handle:
            rates = [float(r["log_pseudo_boxes_per_image"]) for r in csv.DictReader(handle) if r["log_pseudo_boxes_per_image"]]
        assert rates and summary["boxes_per_image"] == pytest.approx(sum(rates) / len(rates))
