"""Tiny configs of every registered recipe: its packaged config plus overrides that shrink it to seconds.

A recipe runs from ``src/cxrdistill/configs/<recipe>.yaml`` (the file users start from; see
``PACKAGED``) with the overrides of :func:`tiny_overrides`: a synthetic world of 24 images at 32 px,
4 optimizer steps a stage (checkpoint every 2), a width-4 backbone, a small bootstrap. The method
parameters of the packaged file stay, except the few in ``RECIPES`` that make a stage long or empty.

Used by the per-recipe smoke test (``test_recipe_smoke.py``) and the crash matrix
(``test_reliability_matrix.py``); both read the same uninterrupted run of each recipe,
trained once per test session (:func:`shared_run`).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

STEPS = 4          # optimizer steps of every stage
CHECKPOINT = 2     # checkpoint every 2 steps: a kill in step 3 resumes from step 2
MAX_STAGE_STEPS = 16  # the smoke test's bound on any stage (epoch-based stages round up)
IMAGE_SIZE = 32
WORLD = {"n_images": 24, "image_size": IMAGE_SIZE, "seed": 2, "splits": [0.6, 0.1, 0.3]}
N_BOOT = 10        # bootstrap replicates of every CI (teacher_student_cls needs >= 10)

DETECTOR = {"kind": "detector", "base_width": 4,
            "options": {"fpn_channels": 8, "fpn_levels": [3, 4], "head_convs": 1}}
CLASSIFIER = {"kind": "classifier", "options": {"arch": "resnet18", "tiny": True}}
HEATMAP = {"kind": "heatmap", "base_width": 4, "options": {"fpn_channels": 8, "output_stride": 4}}
REPORT = {"kind": "report"}

# recipe -> (model section, method params over the packaged ones)
RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "supervised_detector": (DETECTOR, {}),
    "supervised_multitask": (DETECTOR, {}),
    "supervised_heatmap": (HEATMAP, {}),
    "supervised_classifier": (CLASSIFIER, {}),
    "supervised_report": (REPORT, {}),
    "mean_teacher": (DETECTOR, {"burn_in_steps": STEPS}),
    "unbiased_teacher": (DETECTOR, {"threshold": 0.01, "burn_in_steps": STEPS}),
    "soft_teacher": (DETECTOR, {"threshold": 0.01, "burn_in_steps": STEPS}),
    "stac": (DETECTOR, {"threshold": 0.01}),
    "tsd": (DETECTOR, {"pseudo_score_thresh": 0.01, "predict_batch_size": 2, "topk_candidates": 50,
                       "student_steps": STEPS}),
    "ceird": (DETECTOR, {"generations": 2, "pseudo_score_thresh": 0.01, "sa_nms_score_thresh": 0.01,
                         "apclr_score_thresh": 0.01, "predict_batch_size": 2, "topk_candidates": 50,
                         "student_steps": STEPS}),
    "oxnet": (DETECTOR, {"steps": STEPS}),
    "aals": (HEATMAP, {}),
    "cam": (CLASSIFIER, {}),
    "pi_model": (CLASSIFIER, {}),
    "temporal_ensembling": (CLASSIFIER, {}),
    "teacher_student_cls": (CLASSIFIER, {"generations": 2, "kappa": 1.0, "task": "multi_label",
                                         "teacher_epochs": 0.5, "pseudo_epochs": 2.0, "finetune_epochs": 0.5,
                                         "eval_tta": False, "predict_batch_size": 4}),
}

# recipe -> (data overrides, train overrides)
SECTIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "mean_teacher": ({}, {"max_steps": 2 * STEPS}),       # burn-in 4 steps, then 4 mean-teacher steps
    "unbiased_teacher": ({}, {"max_steps": 2 * STEPS}),
    "soft_teacher": ({}, {"max_steps": 2 * STEPS}),
    "teacher_student_cls": ({"weak_fraction": 0.0}, {}),  # enough unlabeled images for a pseudo pass
}

# recipes without a packaged config of their own: the config they start from (their params replace its)
PACKAGED = {"supervised_heatmap": "aals", "supervised_report": "supervised_classifier"}


def packaged_config(name: str) -> Path:
    """The packaged config file a user runs `name` from."""
    from cxrdistill.resources import packaged_configs_dir

    return packaged_configs_dir() / f"{PACKAGED.get(name, name)}.yaml"


def tiny_overrides(name: str, out: Path | str) -> list[str]:
    """`a.b=value` overrides that make :func:`packaged_config` of `name` tiny, writing to `out`."""
    model, params = RECIPES[name]
    data, train = SECTIONS.get(name, ({}, {}))
    values: dict[str, Any] = {"data.manifest": None, "data.synthetic": WORLD, "data.image_size": IMAGE_SIZE,
                              "data.boxed_fraction": 0.4, "data.weak_fraction": 0.3}
    values.update({f"data.{k}": v for k, v in data.items()})
    values.update({f"model.{k}": v for k, v in model.items()})  # model.options replaces the packaged one
    values.update({f"train.{k}": v for k, v in {
        "max_steps": STEPS, "batch_size": 2, "unlabeled_batch_size": 2, "checkpoint_every": CHECKPOINT,
        "log_every": 1, "progress": False, "tensorboard": False, "warmup_steps": 0, **train}.items()})
    params = {"n_boot": N_BOOT, **params}
    if name in PACKAGED:  # another recipe's file: its method section is not this recipe's
        values.update({"method.name": name, "method.params": params})
    else:
        values.update({f"method.params.{k}": v for k, v in params.items()})
    values["output_dir"] = str(out)
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


@contextmanager
def stage_store_off():
    """Every run trains its own supervised stage (no stage read back from the shared store)."""
    previous = os.environ.get("CXRDISTILL_STAGE_STORE")
    os.environ["CXRDISTILL_STAGE_STORE"] = "off"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CXRDISTILL_STAGE_STORE", None)
        else:
            os.environ["CXRDISTILL_STAGE_STORE"] = previous


def train(name: str, out: Path) -> dict[str, float]:
    """`cxrdistill train --config <packaged> <tiny overrides>` through `run_training`, output quiet."""
    from rich.console import Console

    from cxrdistill.run import run_training

    with open(os.devnull, "w") as devnull:
        return run_training(packaged_config(name), tiny_overrides(name, out), console=Console(file=devnull))


def shared_run(root: Path, name: str) -> Path:
    """The uninterrupted tiny run of `name` under `root`, trained once per test session: a file lock
    per recipe lets every test module and xdist worker that needs it wait for one run and read it."""
    out = root / name
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if not (out / "final_metrics.json").is_file():
            shutil.rmtree(out, ignore_errors=True)  # a run that failed earlier in this session starts over
            with stage_store_off():
                train(name, out)
    return out
