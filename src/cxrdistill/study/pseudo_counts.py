"""How many pseudo-boxes a distillation run's teacher handed its student, read from the run folder.

The study table shows it beside Δ vs own teacher, so a recipe that did not help says why (too few
pseudo-boxes: a threshold nothing passes; too many: the teacher's false positives learned too).

- **Offline** recipes (TSD, CEIRD) select once: ``pseudo_selection.json`` (CEIRD: the last
  generation's ``pseudo_selection_gen<k>.json``) holds the boxes kept per class and how many
  unlabeled images got at least one (``collapse``).
- Recipes that log what each step's unlabeled batch received (Unbiased / Soft Teacher, OXnet, and
  STAC with its stored boxes) are read from it first: ``metrics.csv`` has the
  per-class counts of each logged window (``pseudo_boxes/<class>``, OXnet ``teacher_boxes/<class>``)
  and, from this version on, ``log_pseudo_boxes_per_image``; the summary is their mean over the
  training steps, per unlabeled image (older runs: per-batch counts over ``train.unlabeled_batch_size``).
- Consistency recipes (Mean Teacher, Π-model) use soft targets: no pseudo-boxes, no summary.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ONLINE_PREFIXES = ("pseudo_boxes/", "teacher_boxes/")


def pseudo_label_summary(run_dir: Path) -> dict[str, Any] | None:
    """``{"boxes_per_image", "per_class": {class: boxes per image}, "images_with_box" (offline:
    fraction of unlabeled images with a box), "source"}`` of one run, or None without pseudo-boxes."""
    online = _online_summary(run_dir)
    if online is not None:  # what the student got, step by step (also STAC's stored boxes per batch)
        return online
    files = sorted(run_dir.glob("pseudo_selection*.json"), key=lambda p: (len(p.name), p.name))
    if files:  # one selection (TSD), or one per generation (CEIRD): the last
        selection = files[-1]
        info = json.loads(selection.read_text(encoding="utf-8"))
        kept = {str(k): float(v) for k, v in (info.get("kept_per_class") or {}).items()}
        n_images = int((info.get("collapse") or {}).get("n_images") or 0)
        if not n_images:
            return None
        with_box = (info.get("collapse") or {}).get("images_with_box")
        return {"source": "offline", "n_images": n_images, "boxes_per_image": sum(kept.values()) / n_images,
                "per_class": {k: v / n_images for k, v in kept.items()},
                "images_with_box": None if with_box is None else float(with_box) / n_images}
    return None


def _online_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in (rows[0].keys() if rows else ()) if c.startswith(ONLINE_PREFIXES)]
    if not columns:
        return None
    per_class = {c.split("/", 1)[1]: _mean(r.get(c) for r in rows) for c in columns}
    per_batch = sum(v for v in per_class.values() if not math.isnan(v))
    rate = _mean(r.get("log_pseudo_boxes_per_image") for r in rows)
    if math.isnan(rate):  # an older run: per-batch counts over the unlabeled batch
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) if (run_dir / "config.yaml").is_file() else {}
        per_batch_images = int(((config or {}).get("train") or {}).get("unlabeled_batch_size") or 0)
        if not per_batch_images:
            return {"source": "online", "boxes_per_batch": per_batch, "boxes_per_image": None,
                    "per_class": {}, "images_with_box": None}
        rate = per_batch / per_batch_images
    scale = rate / per_batch if per_batch else 0.0
    return {"source": "online", "boxes_per_image": rate, "images_with_box": None,
            "per_class": {k: v * scale for k, v in per_class.items() if not math.isnan(v)}}


def _mean(values: Any) -> float:
    numbers = [float(v) for v in values if v not in (None, "")]
    return sum(numbers) / len(numbers) if numbers else math.nan


def mean_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The seed mean of several runs' summaries (None when none has pseudo-boxes)."""
    found = [s for s in summaries if s is not None and s.get("boxes_per_image") is not None]
    if not found:
        return None
    classes = sorted({k for s in found for k in s["per_class"]})
    with_box = [s["images_with_box"] for s in found if s.get("images_with_box") is not None]
    return {"source": found[0]["source"], "n_runs": len(found),
            "boxes_per_image": sum(s["boxes_per_image"] for s in found) / len(found),
            "per_class": {k: sum(s["per_class"].get(k, 0.0) for s in found) / len(found) for k in classes},
            "images_with_box": sum(with_box) / len(with_box) if with_box else None}


def format_summary(summary: dict[str, Any] | None) -> str:
    """``2.10 per image (active 1.65, obsolete 0.46); 96% of images with one`` — "" without a summary."""
    if not summary or summary.get("boxes_per_image") is None:
        return ""
    classes = ", ".join(f"{k} {v:.2f}" for k, v in summary["per_class"].items())
    text = f"{summary['boxes_per_image']:.2f} per image" + (f" ({classes})" if classes else "")
    if summary.get("images_with_box") is not None:
        text += f"; {summary['images_with_box']:.0%} of images with one"
    return text + (" (online)" if summary["source"] == "online" else "")


__all__ = ["format_summary", "mean_summary", "pseudo_label_summary"]
