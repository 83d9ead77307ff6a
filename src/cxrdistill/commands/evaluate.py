"""Commands ``cxrdistill evaluate`` (metrics JSON + table) and ``cxrdistill report`` (one HTML page)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from cxrdistill.errors import CxrDistillError
from cxrdistill.eval.classification import bootstrap_auroc, classification_summary
from cxrdistill.eval.detection import CocoParams, coco_evaluate, detection_summary, pycocotools_evaluate
from cxrdistill.eval.froc import (
    AALS_FP_RATIOS,
    FROC_FP_RATES,
    FrocResult,
    ModifiedFroc,
    lesion_froc_per_class,
    modified_froc_from_boxes,
)
from cxrdistill.eval.predictions import (
    GroundTruth,
    image_labels,
    image_scores_from_boxes,
    load_ground_truth,
    load_image_scores,
    load_predictions,
)

__all__ = ["evaluate_files", "modified_froc_from_heatmaps", "parse_ious", "register"]


def _heatmap_path(folder: Path, image_id: int, category_id: int, n_classes: int) -> Path | None:
    per_class = folder / f"{image_id}_{category_id}.png"
    if per_class.exists():
        return per_class
    single = folder / f"{image_id}.png"
    return single if n_classes == 1 and single.exists() else None


def modified_froc_from_heatmaps(gt: GroundTruth, folder: Path, bins: int = 1000) -> dict[str, FrocResult]:
    """AALS modified FROC per class from probability-map PNGs.

    ``folder/<image_id>_<category_id>.png`` (or ``<image_id>.png`` with a single class), 8- or
    16-bit grey scaled to [0, 1]; GT boxes are scaled from the image size to the map size. Every
    image of the split needs a map: a missing one raises :class:`CxrDistillError` naming it.
    """
    from PIL import Image

    sizes = {int(im["id"]): (im.get("width"), im.get("height")) for im in gt.coco["images"]}
    out = {}
    for name, cid in zip(gt.class_names, gt.category_ids):
        acc = ModifiedFroc(bins=bins, ratios=AALS_FP_RATIOS)
        boxes: dict[int, list] = {}
        for a in gt.coco["annotations"]:
            if a["category_id"] == cid and not a.get("iscrowd", 0):
                boxes.setdefault(a["image_id"], []).append(a["bbox"])
        for iid in gt.image_ids:
            path = _heatmap_path(folder, iid, cid, len(gt.category_ids))
            if path is None:
                raise CxrDistillError(f"{folder}: no heat map for image {iid}, class {name!r} "
                                      f"(expected {iid}_{cid}.png)")
            with Image.open(path) as im:
                arr = np.asarray(im)
            m = arr.astype(np.float64) / (65535.0 if arr.dtype == np.uint16 else 255.0)
            w, h = sizes[iid]
            if not w or not h:
                raise CxrDistillError(f"image {iid}: width/height missing in the manifest; needed to scale boxes")
            sx, sy = m.shape[1] / float(w), m.shape[0] / float(h)
            b = np.array(boxes.get(iid, []), dtype=float).reshape(-1, 4)
            xyxy = np.stack([b[:, 0] * sx, b[:, 1] * sy, (b[:, 0] + b[:, 2]) * sx, (b[:, 1] + b[:, 3]) * sy], 1)
            acc.add(m, xyxy)
        out[name] = acc.result()
    return out


def _froc_block(results: dict[str, FrocResult], **extra: Any) -> dict[str, Any]:
    scores = [r.score for r in results.values() if not math.isnan(r.score)]
    return {**extra, "mean_score": float(np.mean(scores)) if scores else None,
            "per_class": {k: v.to_dict() for k, v in results.items()}}


def evaluate_files(
    manifest: Path,
    predictions: Path,
    image_scores: Path | None = None,
    split: str | None = "test",
    iou: Sequence[float] = (0.25, 0.5, 0.75),
    froc_criterion: str = "center",
    froc_iou: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    backend: str = "fast",
    heatmaps: Path | None = None,
    modified_froc: bool = False,
) -> dict[str, Any]:
    """All metrics of one prediction file on one split, as a JSON-ready dict.

    ``detection``: COCO AP (``backend`` "fast" numpy or "pycocotools"); ``froc``: lesion FROC per
    class; ``classification``: AUROC with bootstrap CIs from ``image_scores`` or, without it, the
    maximum box score per class. ``modified_froc``: the AALS pixel FROC of the boxes (drawn as
    score maps); ``heatmaps``: the AALS pixel FROC of probability maps in that folder. Undefined
    values are ``None``.
    """
    gt = load_ground_truth(manifest, split=split)
    preds = load_predictions(predictions, gt)
    params = CocoParams(iou_thresholds=tuple(float(t) for t in iou))
    evaluator = {"fast": coco_evaluate, "pycocotools": pycocotools_evaluate}.get(backend)
    if evaluator is None:
        raise CxrDistillError(f"unknown backend {backend!r}: use 'fast' or 'pycocotools'")
    det = detection_summary(evaluator(gt, preds.rows, params), gt.class_names)
    froc = lesion_froc_per_class(gt, preds.rows, criterion=froc_criterion, iou_threshold=froc_iou)
    y, mask = image_labels(gt)
    if image_scores is not None:
        scores, source = load_image_scores(image_scores, gt), str(image_scores)
    else:
        scores, source = image_scores_from_boxes(preds.rows, gt), "max box score per class"
    cls = classification_summary(bootstrap_auroc(y[mask], scores[mask], n_boot=n_boot, seed=seed), gt.class_names)
    cls["score_source"] = source
    notes = list(preds.notes)
    if (~mask).any():
        notes.append(f"{int((~mask).sum())} image(s) with supervision 'none' left out of AUROC")
    result = {
        "manifest": str(manifest), "predictions": str(predictions), "split": gt.split,
        "n_images": len(gt.image_ids), "n_gt_boxes": len(gt.coco["annotations"]), "n_predictions": len(preds.rows),
        "class_names": gt.class_names,
        "detection": det,
        "froc": _froc_block(froc, criterion=froc_criterion, fp_rates=list(FROC_FP_RATES),
                            iou_threshold=froc_iou if froc_criterion == "iou" else None),
        "classification": cls,
        "notes": notes,
    }
    if modified_froc:
        result["modified_froc_boxes"] = _froc_block(modified_froc_from_boxes(gt, preds.rows),
                                                    fp_ratios=list(AALS_FP_RATIOS))
    if heatmaps is not None:
        result["modified_froc_heatmaps"] = _froc_block(modified_froc_from_heatmaps(gt, heatmaps),
                                                       fp_ratios=list(AALS_FP_RATIOS), folder=str(heatmaps))
    return result


def parse_ious(values: Sequence[str]) -> list[float]:
    """IoU thresholds from CLI words: numbers, or inclusive ranges ``START:STOP:STEP``."""
    out: list[float] = []
    for v in values:
        try:
            if ":" in v:
                a, b, step = (float(x) for x in v.split(":"))
                out += np.round(np.arange(a, b + step / 2, step), 4).tolist()
            else:
                out.append(float(v))
        except ValueError:
            raise CxrDistillError(f"--iou: {v!r} is not a number or START:STOP:STEP range") from None
    bad = [t for t in out if not 0 < t <= 1]
    if bad or not out:
        raise CxrDistillError(f"--iou: thresholds must lie in (0, 1], got {out}")
    return sorted(set(out))


def _fmt(x: Any) -> str:
    return "undefined" if x is None else f"{x:.4f}"


def metrics_table(metrics: dict[str, Any]) -> Table:
    """A Rich table: one row per class and a mean row, with AP at each IoU, FROC and AUROC."""
    det, cls, froc = metrics["detection"], metrics["classification"], metrics["froc"]
    ious = det["iou_thresholds"]
    split = "all images" if metrics["split"] is None else f"split {metrics['split']!r}"
    table = Table(title=f"{metrics['predictions']} on {split} ({metrics['n_images']} images)")
    for col in ["class", "AP", *[f"AP@{t:g}" for t in ious], "FROC", "AUROC", "AUROC 95% CI"]:
        table.add_column(col, justify="left" if col == "class" else "right")
    for name in metrics["class_names"]:
        pc, pa = det["per_class"][name], cls["per_class"][name]
        ci = pa["CI95"]
        table.add_row(name, _fmt(pc["AP"]), *[_fmt(pc[f"AP@{t:g}"]) for t in ious],
                      _fmt(froc["per_class"][name]["score"]), _fmt(pa["AUROC"]),
                      "undefined" if ci[0] is None else f"{ci[0]:.3f}–{ci[1]:.3f}")
    mci = cls["macro_AUROC_CI95"]
    table.add_row("mean", _fmt(det["mAP"]), *[_fmt(det[f"mAP@{t:g}"]) for t in ious], _fmt(froc["mean_score"]),
                  _fmt(cls["macro_AUROC"]), "undefined" if mci[0] is None else f"{mci[0]:.3f}–{mci[1]:.3f}",
                  style="bold")
    return table


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` and ``report`` to the CLI."""

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
    def evaluate(
        ctx: typer.Context,
        manifest: Path = typer.Option(..., "--manifest", help="COCO ground-truth / manifest JSON."),
        predictions: Path = typer.Option(..., "--predictions", help="predictions.json (COCO results)."),
        image_scores: Optional[Path] = typer.Option(None, "--image-scores", help="image_scores.json (else max box score)."),
        split: str = typer.Option("test", "--split", help="Images of this split ('all' for every image)."),
        iou: list[str] = typer.Option(["0.25", "0.5", "0.75"], "--iou",
                                      help="IoU thresholds: --iou 0.25 0.5 0.75, or a range START:STOP:STEP (0.4:0.75:0.05)."),
        froc_criterion: str = typer.Option("center", "--froc-criterion", help="'center' or 'iou' lesion hit rule."),
        froc_iou: float = typer.Option(0.5, "--froc-iou", help="IoU for --froc-criterion iou."),
        n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap replicates for AUROC CIs."),
        seed: int = typer.Option(0, "--seed"),
        backend: str = typer.Option("fast", "--backend", help="'fast' (numpy) or 'pycocotools'."),
        heatmaps: Optional[Path] = typer.Option(None, "--heatmaps",
                                                help="Folder of probability-map PNGs → AALS modified FROC."),
        modified_froc: bool = typer.Option(False, "--modified-froc", help="Also the AALS pixel FROC of the boxes."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write the metrics JSON here."),
    ) -> None:
        """Detection mAP, FROC and AUROC (with bootstrap CIs) of a prediction file."""
        try:
            ious = parse_ious([*iou, *ctx.args])
            metrics = evaluate_files(manifest, predictions, image_scores, None if split == "all" else split,
                                     ious, froc_criterion, froc_iou, n_boot, seed, backend, heatmaps, modified_froc)
        except CxrDistillError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        console = Console(width=160)
        console.print(metrics_table(metrics))
        for key in ("modified_froc_boxes", "modified_froc_heatmaps"):
            if key in metrics:
                console.print(f"{key} (AALS, mean recall at 1-10% FP pixels): "
                              f"{_fmt(metrics[key]['mean_score'])}", soft_wrap=True)
        for note in metrics["notes"]:
            console.print(f"note: {note}", soft_wrap=True)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(metrics, indent=2))
            console.print(f"wrote {out}", soft_wrap=True)

    @app.command()
    def report(
        run_dirs: list[Path] = typer.Argument(..., help="One or more run directories."),
        out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
        max_images: int = typer.Option(12, "--max-images", help="Test images drawn per run."),
    ) -> None:
        """One self-contained HTML page: metrics, curves, test images, training curves, config."""
        from cxrdistill.eval.html_report import build_report

        try:
            path = build_report(run_dirs, out, max_images=max_images)
        except CxrDistillError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"wrote {path}")
