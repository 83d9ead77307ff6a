"""Tiny configs of every registered recipe for the crash matrix (tests/test_reliability_matrix.py)."""

from __future__ import annotations

from typing import Any

STEPS = 4          # optimizer steps of every stage
CHECKPOINT = 2     # checkpoint every 2 steps: a kill in step 3 resumes from step 2

DETECTOR = {"kind": "detector", "base_width": 4,
            "options": {"fpn_channels": 8, "fpn_levels": [3, 4], "head_convs": 1}}
CLASSIFIER = {"kind": "classifier", "options": {"arch": "resnet18", "tiny": True}}
HEATMAP = {"kind": "heatmap", "base_width": 4, "options": {"fpn_channels": 8, "output_stride": 4}}

# recipe -> (model section, method params)
RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "supervised_detector": (DETECTOR, {}),
    "supervised_multitask": (DETECTOR, {}),
    "supervised_heatmap": (HEATMAP, {}),
    "supervised_classifier": (CLASSIFIER, {}),
    "supervised_report": ({"kind": "report"}, {}),
    "mean_teacher": (DETECTOR, {"burn_in_steps": STEPS}),
    "unbiased_teacher": (DETECTOR, {"threshold": 0.01, "burn_in_steps": STEPS}),
    "soft_teacher": (DETECTOR, {"threshold": 0.01, "burn_in_steps": STEPS}),
    "stac": (DETECTOR, {"threshold": 0.01}),
    "tsd": (DETECTOR, {"pseudo_score_thresh": 0.01, "predict_batch_size": 2, "topk_candidates": 50}),
    "ceird": (DETECTOR, {"generations": 2, "pseudo_score_thresh": 0.01, "sa_nms_score_thresh": 0.01,
                         "apclr_score_thresh": 0.01, "predict_batch_size": 2, "topk_candidates": 50}),
    "oxnet": (DETECTOR, {"steps": STEPS}),
    "aals": (HEATMAP, {}),
    "cam": (CLASSIFIER, {}),
    "pi_model": (CLASSIFIER, {}),
    "temporal_ensembling": (CLASSIFIER, {}),
    "teacher_student_cls": (CLASSIFIER, {"generations": 2, "kappa": 1.0, "task": "multi_label", "teacher_epochs": 0.5, "pseudo_epochs": 2.0,
                                         "finetune_epochs": 0.5, "eval_tta": False, "n_boot": 10,
                                         "predict_batch_size": 4}),
}


# recipe -> (data overrides, train overrides)
SECTIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "mean_teacher": ({}, {"max_steps": 2 * STEPS}),       # burn-in 4 steps, then 4 mean-teacher steps
    "unbiased_teacher": ({}, {"max_steps": 2 * STEPS}),
    "soft_teacher": ({}, {"max_steps": 2 * STEPS}),
    "teacher_student_cls": ({"weak_fraction": 0.0}, {}),  # enough unlabeled images for a pseudo pass
}


def recipe_config(name: str, manifest: str, cache_dir: str, out: str) -> dict[str, Any]:
    model, params = RECIPES[name]
    data, train = SECTIONS.get(name, ({}, {}))
    params = {"n_boot": 0, **params}
    if name == "teacher_student_cls":
        params["n_boot"] = max(params["n_boot"], 10)
    return {
        "data": {"manifest": manifest, "image_size": 32, "boxed_fraction": 0.4, "weak_fraction": 0.3,
                 "cache_dir": cache_dir, **data},
        "model": model,
        "train": {"max_steps": STEPS, "batch_size": 2, "unlabeled_batch_size": 2, "checkpoint_every": CHECKPOINT,
                  "log_every": 1, "progress": False, "tensorboard": False, "warmup_steps": 0, **train},
        "method": {"name": name, "params": params},
        "output_dir": out,
    }
