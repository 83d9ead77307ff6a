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

      environment.json            versions, command line, git commit (shown in "Environment")
      model.pt                    its sha256 is shown

Image files are found at the manifest's image root (``info.image_root``, which ``prepare``
writes when the manifest lives elsewhere, else the manifest's folder) + ``file_name``.
The evaluated split is ``metrics.json``'s ``split``, else ``test``. Several runs give a
side-by-side comparison table and, for runs on the same manifest, a paired bootstrap of the
chosen metric (``metric``: mAP, mAP@<iou> or macro_AUROC) against the first run.

The page is meant for a paper's supplement: every headline metric has a 95% CI (mAP and FROC:
percentile bootstrap over test images, `eval.ci`; AUROC: its bootstrap), a data and split table,
the environment, paths relative to the page, labelled boxes with a legend drawn at a stated score
threshold (default: the FROC operating point at 1 FP/image). Beside ``out`` the folder
``<stem>_files/`` holds every figure as SVG and every table as CSV and LaTeX.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from cxrdistill.atomic import atomic_write, file_sha256, write_text_atomic
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
.grid{display:flex;flex-wrap:wrap;gap:8px} .grid img{width:300px;border:1px solid #ddd}
.curves img{height:300px;margin-right:8px} pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}
.undef{color:#999;font-style:italic} .files{font-size:12px;color:#555}
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
    label: str = ""
    manifest: Path | None = None
    image_root: Path | None = None
    environment: dict[str, Any] | None = None


def _manifest_path(run: RunArtifacts) -> Path | None:
    raw = (run.config.get("data") or {}).get("manifest") if isinstance(run.config.get("data"), dict) else None
    if not raw:
        return None
    p = Path(raw)
    if not p.is_absolute() and (run.path / p).exists():
        p = run.path / p
    return p


def _image_root(manifest: Path) -> Path:
    """Where the manifest's ``file_name``s live: ``info.image_root`` (absolute or relative to the
    manifest), else the manifest's folder."""
    try:
        info = (json.loads(manifest.read_text()) or {}).get("info") or {}
    except (OSError, ValueError, AttributeError):
        return manifest.parent
    declared = info.get("image_root") if isinstance(info, dict) else None
    if not isinstance(declared, str) or not declared:
        return manifest.parent
    return Path(declared) if os.path.isabs(declared) else manifest.parent / declared


def load_run(path: Path) -> RunArtifacts:
    """Read every piece of a run directory that exists; record a note for each that does not or fails."""
    path = Path(path)
    if not path.is_dir():
        raise CxrDistillError(f"{path}: not a run directory")
    run = RunArtifacts(path=path, name=path.name, label=path.name)
    env = path / "environment.json"
    if env.exists():
        try:
            run.environment = json.loads(env.read_text())
        except ValueError:
            run.notes.append("environment.json is not valid JSON")
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
    run.manifest, run.image_root = manifest, _image_root(manifest)
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


class _Supplement:
    """``<stem>_files/`` beside the page: SVG figures, CSV and LaTeX tables; lists what it wrote."""

    def __init__(self, page: Path) -> None:
        self.page = page
        self.folder = page.parent / f"{page.stem}_files"
        self.written: list[Path] = []

    def figure(self, name: str, svg: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.folder / f"{name}.svg", lambda f: f.write(svg))
        self.written.append(self.folder / f"{name}.svg")

    def table(self, name: str, header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(header)
        writer.writerows([[_plain(c) for c in r] for r in rows])
        write_text_atomic(self.folder / f"{name}.csv", text.getvalue())
        write_text_atomic(self.folder / f"{name}.tex", _latex(header, rows, caption))
        self.written += [self.folder / f"{name}.csv", self.folder / f"{name}.tex"]

    def links(self, prefix: str) -> str:
        mine = [p for p in self.written if p.name.startswith(prefix)]
        if not mine:
            return ""
        rel = [os.path.relpath(p, self.page.parent) for p in mine]
        return ('<p class="files">For a supplement: ' + ", ".join(
            f'<a href="{html.escape(r)}">{html.escape(Path(r).name)}</a>' for r in rel) + "</p>")


def _plain(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _latex(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str) -> str:
    def esc(text: str) -> str:
        return re.sub(r"([&%$#_{}])", r"\\\1", text).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")

    lines = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{esc(caption)}}}",
             r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\hline",
             " & ".join(esc(h) for h in header) + r" \\", r"\hline"]
    lines += [" & ".join(esc(_plain(c)) or "--" for c in r) + r" \\" for r in rows]
    lines += [r"\hline", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def _ci_text(ci: Any) -> str | None:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or ci[0] is None or ci[1] is None:
        return None
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _detection_cis(run: RunArtifacts, n_boot: int) -> dict[str, Any]:
    """Bootstrap CIs of mAP / FROC for this run (empty without predictions)."""
    if run.gt is None or run.rows is None:
        return {}
    from cxrdistill.eval.ci import detection_cis

    ious = (run.metrics or {}).get("detection", {}).get("iou_thresholds") or (0.25, 0.5, 0.75)
    criterion = (run.metrics or {}).get("froc", {}).get("criterion", "center")
    return detection_cis(run.gt, run.rows, ious, n_boot=n_boot, seed=0, froc_criterion=criterion)


def _headline_rows(m: dict[str, Any] | None, cis: dict[str, Any]) -> list[list[Any]]:
    """``[metric, value, 95% CI]`` rows of one metrics.json."""
    if not m:
        return []
    det = m.get("detection", {})
    out = [[k, v, _ci_text(cis.get(k)) if k.startswith("mAP") else None]
           for k, v in det.items() if k.startswith(("mAP", "AP_", "AR@"))]
    if "froc" in m:
        out.append(["FROC (mean)", m["froc"].get("mean_score"), _ci_text(cis.get("FROC"))])
    for key, label in (("modified_froc_boxes", "modified FROC (boxes)"),
                       ("modified_froc_heatmaps", "modified FROC (heat maps)")):
        if key in m:
            out.append([label, m[key].get("mean_score"), None])
    if "classification" in m:
        out.append(["macro AUROC", m["classification"].get("macro_AUROC"),
                    _ci_text(m["classification"].get("macro_AUROC_CI95"))])
    return out


def _headline(m: dict[str, Any] | None) -> dict[str, Any]:
    """Flat headline metrics of one metrics.json."""
    return {r[0]: r[1] for r in _headline_rows(m, {})}


def _metrics_section(run: RunArtifacts, sup: _Supplement, cis: dict[str, Any]) -> str:
    m = run.metrics
    if not m:
        return '<p class="note">no metrics</p>'
    head_rows = _headline_rows(m, cis)
    sup.table(f"{_slug(run.label)}_metrics", ["metric", "value", "95% CI"], head_rows,
              f"{run.label}: test metrics (95% CI: bootstrap over images)")
    parts = [_table(["metric", "value", "95% CI"], head_rows)]
    if cis:
        parts.append(f'<p>95% CIs of mAP and FROC: percentile bootstrap over test images ({cis["n_boot"]} '
                     "replicates, seed 0); AUROC: its own bootstrap. AP_S/M/L and AR have no CI.</p>")
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
        sup.table(f"{_slug(run.label)}_per_class", cols, rows, f"{run.label}: per-class test metrics")
        parts.append(_table(cols, rows))
    return "\n".join(parts)


def split_counts(manifest: Path, raw: dict[str, Any], data_cfg: dict[str, Any]) -> tuple[dict[tuple[str, str], int], str]:
    """Images per (split, supervision) as the run trained: a run with ``data.boxed_fraction`` re-split
    the manifest, so the same re-split is made here. Returns the counts and a sentence ("" when the
    manifest's own supervision applies)."""
    supervision = {int(im["id"]): str(im.get("supervision", "—")) for im in raw.get("images", []) if "id" in im}
    note = ""
    if data_cfg.get("boxed_fraction") is not None:
        try:
            from cxrdistill.data.manifest import load_manifest
            from cxrdistill.data.splits import make_semi_split

            m = make_semi_split(load_manifest(manifest, check_files=False),
                                boxed_fraction=float(data_cfg["boxed_fraction"]),
                                weak_fraction=data_cfg.get("weak_fraction", 0.0),
                                seed=int(data_cfg.get("split_seed", 0)))
            supervision = {im.id: im.supervision for im in m.images}
            note = (f"Supervision as the run trained: the manifest re-split with data.boxed_fraction="
                    f"{data_cfg['boxed_fraction']}, weak_fraction={data_cfg.get('weak_fraction', 0.0)}, "
                    f"split_seed={data_cfg.get('split_seed', 0)}.")
        except (CxrDistillError, ValueError) as err:
            note = f"the run's re-split could not be reproduced ({err}); the manifest's own supervision is shown"
    counts: dict[tuple[str, str], int] = {}
    for im in raw.get("images", []):
        key = (str(im.get("split", "—")), supervision.get(int(im.get("id", -1)), "—"))
        counts[key] = counts.get(key, 0) + 1
    return counts, note


def _data_section(run: RunArtifacts, sup: _Supplement) -> str:
    """Images per split and supervision, and boxes per class in the evaluated split."""
    if run.manifest is None:
        return '<p class="note">data table needs the manifest</p>'
    raw = json.loads(run.manifest.read_text())
    data_cfg = run.config.get("data") if isinstance(run.config.get("data"), dict) else {}
    counts, resplit_note = split_counts(run.manifest, raw, data_cfg)
    resplit = f'<p{" class=note" if resplit_note.startswith("the run") else ""}>{html.escape(resplit_note)}</p>' \
        if resplit_note else ""
    splits = sorted({k[0] for k in counts})
    sups = sorted({k[1] for k in counts})
    rows = [[sp, *[counts.get((sp, su), 0) for su in sups], sum(counts.get((sp, su), 0) for su in sups)]
            for sp in splits]
    header = ["split", *[f"supervision {su}" for su in sups], "images"]
    sup.table(f"{_slug(run.label)}_data", header, rows, f"{run.label}: images per split and supervision")
    parts = [resplit, _table(header, rows)]
    if run.gt is not None:
        by_class = {name: 0 for name in run.gt.class_names}
        names = dict(zip(run.gt.category_ids, run.gt.class_names))
        for a in run.gt.coco["annotations"]:
            by_class[names[a["category_id"]]] += 1
        with_boxes = len({a["image_id"] for a in run.gt.coco["annotations"]})
        parts.append(f"<p>Evaluated split <b>{html.escape(str(run.gt.split))}</b>: {len(run.gt.image_ids)} images, "
                     f"{with_boxes} with boxes; boxes per class:</p>")
        parts.append(_table(["class", "boxes"], list(by_class.items())))
    source = (raw.get("info") or {}).get("source")
    if source:
        parts.append(f"<p>Source: {html.escape(str(source))}</p>")
    return "\n".join(parts)


def _curves_section(run: RunArtifacts, sup: _Supplement, fp_per_image: float | None) -> str:
    if run.gt is None or run.rows is None:
        return '<p class="note">curves need the manifest and eval/predictions.json</p>'
    gt, names = run.gt, run.gt.class_names
    slug = _slug(run.label)
    ious = tuple((run.metrics or {}).get("detection", {}).get("iou_thresholds", (0.25, 0.5, 0.75)))
    res = coco_evaluate(gt, run.rows, CocoParams(iou_thresholds=ious))
    imgs = []
    for t in ious[:3]:
        imgs.append(_img(plots.pr_curves(res, names, t), f"PR curve IoU {t:g}"))
        sup.figure(f"{slug}_pr_iou{t:g}", plots.pr_curves(res, names, t, fmt="svg"))
    y, mask = image_labels(gt)
    scores = run.image_scores if run.image_scores is not None else image_scores_from_boxes(run.rows, gt)
    imgs.append(_img(plots.roc_curves(y[mask], scores[mask], names), "ROC curves"))
    sup.figure(f"{slug}_roc", plots.roc_curves(y[mask], scores[mask], names, fmt="svg"))
    froc_cfg = (run.metrics or {}).get("froc", {})
    froc = lesion_froc_per_class(gt, run.rows, criterion=froc_cfg.get("criterion", "center"),
                                 iou_threshold=froc_cfg.get("iou_threshold") or 0.5)
    imgs.append(_img(plots.froc_curves(froc, operating_fp=fp_per_image), "FROC curves"))
    sup.figure(f"{slug}_froc", plots.froc_curves(froc, operating_fp=fp_per_image, fmt="svg"))
    return '<div class="curves">' + "".join(imgs) + "</div>"


def _read_gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("F"), dtype=np.float32)


def _threshold(run: RunArtifacts, score_threshold: float | None, fp_per_image: float) -> tuple[float | None, str]:
    """The box cut-off of the image grid and the sentence that states it."""
    if score_threshold is not None:
        return score_threshold, f"score ≥ {score_threshold:g} (set by the user)"
    if run.gt is None or not run.rows:
        return None, "no predictions"
    from cxrdistill.eval.ci import froc_threshold

    t = froc_threshold(run.gt, run.rows, fp_per_image)
    return t, (f"score ≥ {t:.3f}: the FROC operating point at {fp_per_image:g} false positive(s) per image "
               "on this test set (choose another with --score-threshold)")


def _images_section(run: RunArtifacts, max_images: int, threshold: float | None, statement: str) -> str:
    if run.gt is None or run.image_root is None:
        return '<p class="note">image grid needs the manifest</p>'
    root = run.image_root
    gt = run.gt
    name_of = dict(zip(gt.category_ids, gt.class_names))
    boxes: dict[int, list] = {}
    for a in gt.coco["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a)
    preds: dict[int, list] = {}
    for r in run.rows or []:
        if threshold is not None and r["score"] >= threshold:
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
        g = boxes.get(iid, [])
        png = plots.image_with_boxes(image, np.array([a["bbox"] for a in g]), np.array([r["bbox"] for r in p]),
                                     np.array([r["score"] for r in p]), heatmap=heat, title=f"image {iid}",
                                     gt_labels=[name_of[a["category_id"]] for a in g],
                                     pred_labels=[name_of[r["category_id"]] for r in p])
        tiles.append(_img(png, f"image {iid}"))
    note = (f'<p class="note">{len(missing)} image file(s) could not be read, e.g. '
            f'{html.escape(_relative(Path(missing[0]), run.path))}</p>' if missing else "")
    shown = sum(min(len(preds.get(i, [])), 10) for i in ids)
    legend = (f"<p>Ground-truth boxes green with their class; predictions red with class and score, "
              f"drawn at {html.escape(statement)}, at most 10 per image ({shown} drawn).</p>")
    return legend + note + '<div class="grid">' + "".join(tiles) + "</div>"


def _training_section(run: RunArtifacts) -> str:
    rows = run.training
    if not rows:
        return '<p class="note">no training log</p>'
    cols = [c for c in rows[0] if c not in ("step", "stage", "wall_s")]

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
    wall = {}
    for r in rows:
        if r.get("wall_s") not in (None, ""):
            wall[r.get("stage", "")] = num(r["wall_s"])
    timing = ("<p>Wall clock per stage: " + ", ".join(f"{html.escape(k or '—')} {v:.0f} s" for k, v in wall.items())
              + "</p>") if wall else ""
    return timing + _img(plots.training_curves(columns, steps, [r.get("stage", "") or "" for r in rows]),
                         "training curves")


def _environment_section(run: RunArtifacts, page_dir: Path) -> str:
    env = run.environment or {}
    rows: list[list[Any]] = []
    if env:
        rows.append(["python", env.get("python")])
        rows += [[name, version or "not installed"] for name, version in (env.get("packages") or {}).items()]
        rows.append(["platform", env.get("platform")])
        rows.append(["CUDA", env.get("cuda") or "none"])
        rows.append(["GPUs", ", ".join(env.get("gpus") or []) or "none"])
        rows.append(["git commit", env.get("git_commit") or "not a git checkout (installed package)"])
        argv = env.get("argv") or []
        if argv:
            rows.append(["command line", " ".join(["cxrdistill", *[_relative_arg(a, page_dir) for a in argv[1:]]])])
    else:
        rows.append(["environment", "no environment.json in the run directory"])
    model = run.path / "model.pt"
    rows.append(["model.pt sha256", file_sha256(model) if model.is_file() else "no model.pt"])
    return _table(["item", "value"], rows)


def _relative(path: Path, start: Path) -> str:
    """`path` relative to `start` when both are on one file system tree (never an absolute local path)."""
    try:
        return os.path.relpath(Path(path).resolve(), Path(start).resolve())
    except ValueError:
        return Path(path).name


def _relative_arg(arg: str, page_dir: Path) -> str:
    return _relative(Path(arg), page_dir) if os.path.isabs(arg) else arg


def _relative_config(run: RunArtifacts, page_dir: Path) -> str:
    """config.yaml with absolute paths rewritten relative to the page's folder."""
    if not run.config:
        return run.config_text or ""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, str) and os.path.isabs(x) and len(x) > 1:
            return _relative(Path(x), page_dir)
        return x

    return yaml.safe_dump(walk(run.config), sort_keys=False)


def _paired(base: RunArtifacts, other: RunArtifacts, metric: str, n_boot: int):
    """Paired bootstrap of `metric` (mAP, mAP@<iou>, macro_AUROC) of `other` − `base`, or None."""
    from cxrdistill.eval.compare import compare_auroc

    if base.gt is None or other.gt is None or base.gt.path != other.gt.path or base.gt.split != other.gt.split:
        return None
    if metric == "macro_AUROC":
        y, mask = image_labels(base.gt)
        scores = []
        for r in (base, other):
            if r.image_scores is not None:
                scores.append(r.image_scores)
            elif r.rows is not None:
                scores.append(image_scores_from_boxes(r.rows, r.gt))
            else:
                return None
        return compare_auroc(y[mask], scores[0][mask], scores[1][mask], n_boot=n_boot, seed=0)
    if base.rows is None or other.rows is None:
        return None
    iou = None if metric == "mAP" else float(metric.split("@", 1)[1])
    ious = tuple((base.metrics or {}).get("detection", {}).get("iou_thresholds") or (0.25, 0.5, 0.75))
    if iou is not None and iou not in ious:
        ious = tuple(sorted({*ious, iou}))
    return compare_detection(base.gt, base.rows, other.rows, params=CocoParams(iou_thresholds=ious), iou=iou,
                             n_boot=n_boot, seed=0)


def _comparison_section(runs: Sequence[RunArtifacts], n_boot: int, metric: str, sup: _Supplement,
                        cis: Sequence[dict[str, Any]]) -> str:
    heads = [{r[0]: (r[1], r[2]) for r in _headline_rows(run.metrics, c)} for run, c in zip(runs, cis)]
    keys = list(dict.fromkeys(k for h in heads for k in h))
    header = ["metric", *[r.label for r in runs]]
    rows = [[k, *[h.get(k, (None, None))[0] for h in heads]] for k in keys]
    sup.table("comparison", header, rows, "Test metrics of the compared runs")
    parts = [_table(header, rows)]
    base = runs[0]
    paired = []
    for r in runs[1:]:
        c = _paired(base, r, metric, n_boot)
        if c is not None:
            paired.append([f"{r.label} − {base.label}", c.diff, c.ci_low, c.ci_high, c.p_boot])
    if paired:
        title = f"Paired bootstrap over images ({metric}, {n_boot} replicates, seed 0)"
        sup.table("comparison_paired", ["runs", "difference", "CI low", "CI high", "p_boot"], paired, title)
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append(_table(["runs", "difference", "CI low", "CI high", "p_boot"], paired))
    return "\n".join(parts)


def _labels(runs: Sequence[RunArtifacts], names: Sequence[str] | None) -> None:
    """Each run's label: the given name, else its folder name, made unique with parent folders."""
    if names is not None:
        if len(names) != len(runs):
            raise CxrDistillError(f"report: {len(names)} names for {len(runs)} runs")
        for run, name in zip(runs, names):
            run.label = name
        return
    for run in runs:
        run.label = run.name
    depth = 1
    while len({r.label for r in runs}) < len(runs) and depth < 4:
        depth += 1
        for run in runs:
            run.label = "/".join(run.path.resolve().parts[-depth:])


def build_report(run_dirs: Sequence[Path], out: Path, max_images: int = 12, n_boot: int = 200, *,
                 names: Sequence[str] | None = None, metric: str = "mAP", score_threshold: float | None = None,
                 fp_per_image: float = 1.0) -> Path:
    """Write the HTML report of ``run_dirs`` to ``out`` (+ ``<stem>_files/``) and return its path.

    ``names``: run labels (default: folder names, made unique); ``metric``: the paired test's
    metric; ``score_threshold``: the boxes drawn (default: the FROC operating point at
    ``fp_per_image``)."""
    if not run_dirs:
        raise CxrDistillError("report: give at least one run directory")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page_dir = out.parent
    sup = _Supplement(out)
    runs = [load_run(Path(d)) for d in run_dirs]
    _labels(runs, names)
    cis = [_detection_cis(run, n_boot) for run in runs]
    body = [f"<h1>cxrdistill report — {html.escape(', '.join(r.label for r in runs))}</h1>"]
    if len(runs) > 1:
        body += ['<h2 id="comparison">Comparison</h2>', _comparison_section(runs, n_boot, metric, sup, cis),
                 sup.links("comparison")]
    for i, (run, run_cis) in enumerate(zip(runs, cis)):
        threshold, statement = _threshold(run, score_threshold, fp_per_image)
        sections = [("metrics", "Metrics", _metrics_section(run, sup, run_cis)),
                    ("data", "Data and splits", _data_section(run, sup)),
                    ("curves", "Curves", _curves_section(run, sup, fp_per_image if score_threshold is None else None)),
                    ("images", "Test images", _images_section(run, max_images, threshold, statement)),
                    ("training", "Training curves", _training_section(run)),
                    ("environment", "Environment", _environment_section(run, page_dir)),
                    ("config", "Config (paths relative to this page)",
                     f"<pre>{html.escape(_relative_config(run, page_dir))}</pre>" if run.config_text
                     else '<p class="note">no config.yaml</p>')]
        body.append(f'<h2 id="run-{i}">Run {html.escape(run.label)}</h2>'
                    f"<p>{html.escape(_relative(run.path, page_dir))}</p>")
        if run.notes:
            body.append('<ul class="note" id="notes-' + str(i) + '">' +
                        "".join(f"<li>{html.escape(n)}</li>" for n in run.notes) + "</ul>")
        for sid, title, content in sections:
            body.append(f'<h3 id="{sid}-{i}">{title}</h3>{content}')
        body.append(sup.links(_slug(run.label) + "_"))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cxrdistill report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    write_text_atomic(out, page)
    return out
