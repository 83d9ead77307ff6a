"""A classifier's held-out scores for one task (`data.targets`): AUROC per output with a bootstrap
CI, kept on disk so that a finished stage is not predicted again.

``<out_dir>/scores.npz`` holds ``image_ids (N,)``, ``scores (N, K)`` and ``truth (N, K)`` (the task's
encoding of each image's labels); ``<out_dir>/metrics.json`` the AUROC summary. With
:func:`write_image_scores` the outputs that are manifest classes also go to ``image_scores.json``,
the file `cxrdistill report` and a study's paired comparison read.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrdistill.atomic import atomic_write, write_json_atomic
from cxrdistill.data.dataset import CXRDataset
from cxrdistill.data.targets import ClassificationTask
from cxrdistill.eval.classification import bootstrap_auroc, classification_summary
from cxrdistill.eval.runs import image_score_rows
from cxrdistill.eval.tta import Predict, predict_dataset

SCORES = "scores.npz"


def task_truth(dataset: CXRDataset, ids: list[int], task: ClassificationTask) -> np.ndarray:
    """``(N, K)`` float32: the task's targets of the images ``ids`` (their full manifest labels)."""
    if not ids:
        return np.zeros((0, task.num_outputs), np.float32)
    return np.stack([task.encode(dataset.manifest.image_labels(i), i) for i in ids])


def score_task(predict: Predict, dataset: CXRDataset, task: ClassificationTask, out_dir: Path, *, stage: str,
               split: str, reuse: bool, tta: bool, crop_fraction: float, batch_size: int, n_boot: int,
               device: torch.device | None = None, write: bool = True) -> dict[str, Any]:
    """AUROC (+ seeded bootstrap CI) of ``predict`` (images → probabilities ``(B, K)``, model in eval
    mode) on ``dataset``; writes ``out_dir/{scores.npz, metrics.json}`` when ``write``.

    ``reuse``: read the scores saved by an earlier run of this (finished, skipped) stage instead of
    predicting. Returns ``{"stage", "summary", "scores" (N, K), "truth" (N, K), "image_ids"}``.
    """
    path = out_dir / SCORES
    if reuse and path.is_file():
        saved = np.load(path, allow_pickle=False)
        ids, scores, truth = saved["image_ids"].tolist(), saved["scores"], saved["truth"]
    else:
        ids, probs = predict_dataset(predict, dataset, tta=tta, num_outputs=task.num_outputs,
                                     crop_fraction=crop_fraction, batch_size=batch_size, device=device)
        scores, truth = probs.numpy(), task_truth(dataset, ids, task)
    summary = classification_summary(bootstrap_auroc(truth, scores, n_boot=n_boot, seed=0), task.output_names)
    if write:
        buffer = io.BytesIO()
        np.savez(buffer, image_ids=np.asarray(ids, np.int64), scores=scores, truth=truth)
        atomic_write(path, lambda f: f.write(buffer.getvalue()))
        write_json_atomic(out_dir / "metrics.json", {"stage": stage, "split": split, "tta": tta, **summary}, indent=2)
    return {"stage": stage, "summary": summary, "scores": scores, "truth": truth, "image_ids": ids}


def write_image_scores(result: dict[str, Any], dataset: CXRDataset, task: ClassificationTask, out_dir: Path,
                       *, split: str, tta: bool) -> None:
    """``out_dir/metrics.json`` (the stage's summary, under ``classification`` as every recipe writes it)
    and ``out_dir/image_scores.json`` (the outputs that are manifest classes; none for ``any_finding``)."""
    category_of = dict(zip(dataset.manifest.class_names, dataset.manifest.category_ids))
    columns = [k for k, name in enumerate(task.output_names) if name in category_of]
    write_json_atomic(out_dir / "metrics.json", {"stage": result["stage"], "split": split, "tta": tta,
                                                 "classification": result["summary"]}, indent=2)
    if columns:
        rows = image_score_rows(result["image_ids"], np.asarray(result["scores"])[:, columns],
                                [category_of[task.output_names[k]] for k in columns])
        write_json_atomic(out_dir / "image_scores.json", rows)


__all__ = ["SCORES", "score_task", "task_truth", "write_image_scores"]
