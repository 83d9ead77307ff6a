"""Commands ``cxrdistill evaluate`` (metrics JSON + table) and ``cxrdistill report`` (one HTML page)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from cxrdistill.atomic import write_json_atomic
from cxrdistill.errors import CxrDistillError
from cxrdistill.eval.metrics import evaluate_files, evaluate_predictions, modified_froc_from_heatmaps

__all__ = ["evaluate_files", "evaluate_predictions", "modified_froc_from_heatmaps", "parse_ious", "register"]


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


PROTOCOLS = ("coco", "voc", "ceird")


def apply_protocol(metrics: dict[str, Any], protocol: str, manifest: Path, predictions: Path,
                   split: str | None, ious: Sequence[float]) -> dict[str, Any]:
    """Replace the COCO AP block of ``metrics`` by the VOC all-point AP of ``protocol`` ("voc" /
    "ceird"); "coco" returns ``metrics`` with ``detection.protocol = "coco"``."""
    if protocol == "coco":
        metrics["detection"]["protocol"] = "coco"
        return metrics
    from cxrdistill.eval.detection import CEIRD_PROTOCOL, VOC_PROTOCOL, voc_detection_summary
    from cxrdistill.eval.predictions import load_ground_truth, load_predictions

    gt = load_ground_truth(manifest, split=split)
    rows = load_predictions(predictions, gt).rows
    metrics["detection"] = voc_detection_summary(gt, rows, ious, CEIRD_PROTOCOL if protocol == "ceird" else VOC_PROTOCOL)
    metrics["notes"] = [*metrics.get("notes", []), f"AP: {protocol} protocol (VOC all-point interpolation"
                        + ("; scores > 0.05, 100 per image, AP 0 for classes without ground truth)"
                           if protocol == "ceird" else ")")]
    return metrics


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
        protocol: str = typer.Option("coco", "--protocol",
                                     help="AP protocol: 'coco' (101-point, pycocotools), 'voc' (all-point) or "
                                          "'ceird' (VOC all-point, scores > 0.05, AP 0 for classes without "
                                          "ground truth); docs/metrics.md."),
    ) -> None:
        """Detection mAP, FROC and AUROC (with bootstrap CIs) of a prediction file."""
        try:
            if protocol not in PROTOCOLS:
                raise CxrDistillError(f"--protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
            ious = parse_ious([*iou, *ctx.args])
            metrics = evaluate_files(manifest, predictions, image_scores, None if split == "all" else split,
                                     ious, froc_criterion, froc_iou, n_boot, seed, backend, heatmaps, modified_froc)
            metrics = apply_protocol(metrics, protocol, manifest, predictions, None if split == "all" else split, ious)
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
            write_json_atomic(out, metrics, indent=2)
            console.print(f"wrote {out}", soft_wrap=True)

    @app.command()
    def report(
        run_dirs: list[Path] = typer.Argument(..., help="One or more run directories."),
        out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
        max_images: int = typer.Option(12, "--max-images", help="Test images drawn per run."),
        score_threshold: Optional[float] = typer.Option(
            None, "--score-threshold", help="Draw boxes scoring at least this (default: the FROC operating "
            "point at --fp-per-image false positives per image)."),
        fp_per_image: float = typer.Option(1.0, "--fp-per-image", help="FROC operating point of the default threshold."),
        metric: str = typer.Option("mAP", "--metric", help="Paired test of several runs: mAP, mAP@<iou> or macro_AUROC."),
        n_boot: int = typer.Option(200, "--n-boot", help="Bootstrap replicates (CIs, paired test)."),
    ) -> None:
        """One self-contained HTML page (metrics with CIs, data, curves, test images, training curves,
        environment, config) plus SVG figures and CSV/LaTeX tables in <stem>_files/."""
        from cxrdistill.eval.html_report import build_report

        try:
            path = build_report(run_dirs, out, max_images=max_images, n_boot=n_boot, metric=metric,
                                score_threshold=score_threshold, fp_per_image=fp_per_image)
        except CxrDistillError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"wrote {path}")
