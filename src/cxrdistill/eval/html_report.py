"""One self-contained HTML page (all images base64-embedded) for one or more runs.

Run-directory layout read here (every piece optional; a missing one is noted on the page)::

    RUN_DIR/
      config.yaml                 the run's config; ``data.manifest`` is the manifest path
                                  (absolute, or relative to RUN_DIR, else to the working directory)
      metrics.csv                 training log: columns ``step``, ``stage``, then loss / metric columns
      eval/metrics.json           written by ``cxrdistill evaluate --out`` (tables come from here)
      eval/predictions.json       COCO results (boxes) → PR / FROC curves and the image grid
      eval/image_scores.json      image-level scores → ROC curves (else the max box score per class)
      eval/heatmaps/<image_id>.png  optional probability map of an image, drawn over it

Image files are found at the manifest's directory + ``file_name`` (PNG / JPEG via Pillow).
The evaluated split is ``metrics.json``'s ``split``, else ``test``. Several runs give a
side-by-side comparison table and, for runs on the same manifest, a paired bootstrap of mAP
against the first run.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml
from PIL import Image

from cxrdistill.errors import CxrDistillError
from cxrdistill.eval import plots
from cxrdistill.eval.classification import bootstrap_auroc, classification_summary
from cxrdistill.eval.compare import compare_detection
from cxrdistill.eval.detection import CocoParams, coco_evaluate, detection_summary
from cxrdistill.eval.froc import lesion_froc_per_class
from cxrdistill.eval.predictions import (
    GroundTruth,
    image_labels,
    image_scores_from_boxes,
    load_ground_truth,
    load_image_scores,
    load_predictions,
)

__all__ = ["RunArtifacts", "load_run", "build_report"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1340px}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
h3{font-size:15px} table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left} .note{color:#a05000;font-size:13px}
.grid{display:flex;flex-wrap:wrap;gap:8px} .grid img{width:210px;border:1px solid #ddd}
.curves img{height:300px;margin-right:8px} pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}
.undef{color:#999;font-style:italic}
"""


@dataclass
class RunArtifacts:
    """What was found in one run directory, and notes about what was not."""

    path: Path
    name: str
    config_text: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    training: list[dict[str, str]] | None = None
    metrics: dict[str, Any] | None = None
    gt: GroundTruth | None = None
    rows: list[dict[str, Any]] | None = None
    image_scores: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def _manifest_path(run: RunArtifacts) -> Path | None:
    raw = (run.config.get("data") or {}).get("manifest") if isinstance(run.config.get("data"), dict) else None
    if not raw:
        return None
    p = Path(raw)
    if not p.is_absolute() and (run.path / p).exists():
        p = run.path / p
    return p


def load_run(path: Path) -> RunArtifacts:
    """Read every piece of a run directory that exists; record a note for each that does not or fails."""
    path = Path(path)
    if not path.is_dir():
        raise CxrDistillError(f"{path}: not a run directory")
    run = RunArtifacts(path=path, name=path.name)
    cfg = path / "config.yaml"
    if cfg.exists():
        run.config_text = cfg.read_text()
        try:
            run.config = yaml.safe_load(run.config_text) or {}
        except yaml.YAMLError as err:
            run.notes.append(f"config.yaml is not valid YAML: {err}")
    else:
        run.notes.append("no config.yaml")
    log = path / "metrics.csv"
    if log.exists():
        with log.open(newline="") as f:
            run.training = list(csv.DictReader(f))
    else:
        run.notes.append("no metrics.csv (training curves skipped)")
    mj = path / "eval" / "metrics.json"
    if mj.exists():
        run.metrics = json.loads(mj.read_text())
    else:
        run.notes.append("no eval/metrics.json (metrics computed from predictions if possible: default settings, 200 bootstrap replicates)")
    manifest = _manifest_path(run)
    if manifest is None or not manifest.exists():
        run.notes.append(f"manifest not found ({manifest or 'config.yaml has no data.manifest'}): "
                         "curves and image grid skipped")
        return run
    split = (run.metrics or {}).get("split", "test")
    try:
        run.gt = load_ground_truth(manifest, split=split)
    except CxrDistillError as err:
        run.notes.append(f"manifest could not be read: {err}")
        return run
    pj = path / "eval" / "predictions.json"
    if pj.exists():
        try:
            preds = load_predictions(pj, run.gt)
            run.rows = preds.rows
            run.notes += preds.notes
        except CxrDistillError as err:
            run.notes.append(f"predictions could not be read: {err}")
    else:
        run.notes.append("no eval/predictions.json (PR / FROC curves and boxes skipped)")
    sj = path / "eval" / "image_scores.json"
    if sj.exists():
        try:
            run.image_scores = load_image_scores(sj, run.gt)
        except CxrDistillError as err:
            run.notes.append(f"image scores could not be read: {err}")
    if run.metrics is None and run.rows is not None:
        ious = (0.25, 0.5, 0.75)
        names = run.gt.class_names
        froc = lesion_froc_per_class(run.gt, run.rows)
        froc_scores = [r.score for r in froc.values() if not math.isnan(r.score)]
        y, mask = image_labels(run.gt)
        scores = run.image_scores if run.image_scores is not None else image_scores_from_boxes(run.rows, run.gt)
        run.metrics = {"split": run.gt.split, "n_images": len(run.gt.image_ids), "class_names": names,
                       "detection": detection_summary(coco_evaluate(run.gt, run.rows, CocoParams(ious)), names),
                       "froc": {"criterion": "center", "mean_score": float(np.mean(froc_scores)) if froc_scores else None,
                                "per_class": {k: v.to_dict() for k, v in froc.items()}},
                       "classification": classification_summary(
                           bootstrap_auroc(y[mask], scores[mask], n_boot=200, seed=0), names)}
    return run


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _v(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return '<span class="undef">undefined</span>'
    return f"{x:.4f}" if isinstance(x, float) else html.escape(str(x))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_v(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _headline(m: dict[str, Any] | None) -> dict[str, Any]:
    """Flat headline metrics of one metrics.json."""
    if not m:
        return {}
    det = m.get("detection", {})
    out = {k: v for k, v in det.items() if k.startswith(("mAP", "AP_", "AR@"))}
    if "froc" in m:
        out["FROC (mean)"] = m["froc"].get("mean_score")
    for key, label in (("modified_froc_boxes", "modified FROC (boxes)"),
                       ("modified_froc_heatmaps", "modified FROC (heat maps)")):
        if key in m:
            out[label] = m[key].get("mean_score")
    if "classification" in m:
        out["macro AUROC"] = m["classification"].get("macro_AUROC")
    return out


def _metrics_section(run: RunArtifacts) -> str:
    m = run.metrics
    if not m:
        return '<p class="note">no metrics</p>'
    parts = [_table(["metric", "value"], list(_headline(m).items()))]
    det = m.get("detection", {})
    names = m.get("class_names") or list(det.get("per_class", {}))
    if names and det.get("per_class"):
        keys = list(next(iter(det["per_class"].values())))
        cols = ["class", *keys]
        extra = []
        if "froc" in m:
            cols.append("FROC")
            extra.append(lambda n: m["froc"]["per_class"].get(n, {}).get("score"))
        if "classification" in m:
            cols += ["AUROC", "CI low", "CI high"]
            pc = m["classification"]["per_class"]
            extra += [lambda n: pc[n]["AUROC"], lambda n: pc[n]["CI95"][0], lambda n: pc[n]["CI95"][1]]
        rows = [[n, *[det["per_class"][n][k] for k in keys], *[f(n) for f in extra]] for n in names]
        parts.append(_table(cols, rows))
    return "\n".join(parts)


def _curves_section(run: RunArtifacts) -> str:
    if run.gt is None or run.rows is None:
        return '<p class="note">curves need the manifest and eval/predictions.json</p>'
    gt, names = run.gt, run.gt.class_names
    ious = tuple((run.metrics or {}).get("detection", {}).get("iou_thresholds", (0.25, 0.5, 0.75)))
    res = coco_evaluate(gt, run.rows, CocoParams(iou_thresholds=ious))
    imgs = [_img(plots.pr_curves(res, names, t), f"PR curve IoU {t:g}") for t in ious[:3]]
    y, mask = image_labels(gt)
    scores = run.image_scores if run.image_scores is not None else image_scores_from_boxes(run.rows, gt)
    imgs.append(_img(plots.roc_curves(y[mask], scores[mask], names), "ROC curves"))
    froc_cfg = (run.metrics or {}).get("froc", {})
    froc = lesion_froc_per_class(gt, run.rows, criterion=froc_cfg.get("criterion", "center"),
                                 iou_threshold=froc_cfg.get("iou_threshold") or 0.5)
    imgs.append(_img(plots.froc_curves(froc), "FROC curves"))
    return '<div class="curves">' + "".join(imgs) + "</div>"


def _read_gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("F"), dtype=np.float32)


def _images_section(run: RunArtifacts, max_images: int, score_threshold: float = 0.3) -> str:
    if run.gt is None:
        return '<p class="note">image grid needs the manifest</p>'
    root = Path(_manifest_path(run)).parent  # type: ignore[arg-type]
    gt = run.gt
    boxes: dict[int, list] = {}
    for a in gt.coco["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a["bbox"])
    preds: dict[int, list] = {}
    for r in run.rows or []:
        if r["score"] >= score_threshold:
            preds.setdefault(r["image_id"], []).append(r)
    ids = sorted(gt.image_ids, key=lambda i: (i not in boxes, i))[:max_images]
    tiles, missing = [], []
    for iid in ids:
        info = gt.images_by_id[iid]
        path = root / str(info.get("file_name", ""))
        try:
            image = _read_gray(path)
        except (OSError, ValueError):
            missing.append(str(path))
            continue
        p = sorted(preds.get(iid, []), key=lambda r: -r["score"])[:10]
        hm_path = run.path / "eval" / "heatmaps" / f"{iid}.png"
        heat = _read_gray(hm_path) / 255.0 if hm_path.exists() else None
        png = plots.image_with_boxes(image, np.array(boxes.get(iid, [])), np.array([r["bbox"] for r in p]),
                                     np.array([r["score"] for r in p]), heatmap=heat, title=f"image {iid}")
        tiles.append(_img(png, f"image {iid}"))
    note = (f'<p class="note">{len(missing)} image file(s) could not be read, e.g. {html.escape(missing[0])}</p>'
            if missing else "")
    legend = f"<p>GT boxes green, predictions red (score ≥ {score_threshold}, top 10).</p>"
    return legend + note + '<div class="grid">' + "".join(tiles) + "</div>"


def _training_section(run: RunArtifacts) -> str:
    rows = run.training
    if not rows:
        return '<p class="note">no training log</p>'
    cols = [c for c in rows[0] if c not in ("step", "stage")]

    def num(x: str | None) -> float:
        try:
            return float(x) if x not in (None, "") else math.nan
        except ValueError:
            return math.nan

    columns = {c: [num(r.get(c)) for r in rows] for c in cols}
    columns = {c: v for c, v in columns.items() if not all(math.isnan(x) for x in v)}
    if not columns:
        return '<p class="note">metrics.csv has no numeric columns</p>'
    steps = [num(r.get("step")) for r in rows]
    return _img(plots.training_curves(columns, steps, [r.get("stage", "") or "" for r in rows]), "training curves")


def _comparison_section(runs: Sequence[RunArtifacts], n_boot: int) -> str:
    heads = [_headline(r.metrics) for r in runs]
    keys = list(dict.fromkeys(k for h in heads for k in h))
    parts = [_table(["metric", *[r.name for r in runs]], [[k, *[h.get(k) for h in heads]] for k in keys])]
    base = runs[0]
    paired = []
    for r in runs[1:]:
        if base.gt is not None and r.gt is not None and base.rows is not None and r.rows is not None \
                and base.gt.path == r.gt.path and base.gt.split == r.gt.split:
            c = compare_detection(base.gt, base.rows, r.rows, n_boot=n_boot, seed=0)
            paired.append([f"{r.name} − {base.name}", c.diff, c.ci_low, c.ci_high, c.p_boot])
    if paired:
        parts.append(f"<h3>Paired bootstrap over images (mAP@0.5:0.95, {n_boot} replicates, seed 0)</h3>")
        parts.append(_table(["runs", "difference", "CI low", "CI high", "p_boot"], paired))
    return "\n".join(parts)


def build_report(run_dirs: Sequence[Path], out: Path, max_images: int = 12, n_boot: int = 200) -> Path:
    """Write the HTML report of ``run_dirs`` to ``out`` and return its path."""
    if not run_dirs:
        raise CxrDistillError("report: give at least one run directory")
    runs = [load_run(Path(d)) for d in run_dirs]
    body = [f"<h1>cxrdistill report — {html.escape(', '.join(r.name for r in runs))}</h1>"]
    if len(runs) > 1:
        body += ['<h2 id="comparison">Comparison</h2>', _comparison_section(runs, n_boot)]
    for i, run in enumerate(runs):
        sections = [("metrics", "Metrics", _metrics_section(run)), ("curves", "Curves", _curves_section(run)),
                    ("images", "Test images", _images_section(run, max_images)),
                    ("training", "Training curves", _training_section(run)),
                    ("config", "Config", f"<pre>{html.escape(run.config_text)}</pre>" if run.config_text
                     else '<p class="note">no config.yaml</p>')]
        body.append(f'<h2 id="run-{i}">Run {html.escape(run.name)}</h2><p>{html.escape(str(run.path))}</p>')
        if run.notes:
            body.append('<ul class="note" id="notes-' + str(i) + '">' +
                        "".join(f"<li>{html.escape(n)}</li>" for n in run.notes) + "</ul>")
        for sid, title, content in sections:
            body.append(f'<h3 id="{sid}-{i}">{title}</h3>{content}')
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cxrdistill report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
