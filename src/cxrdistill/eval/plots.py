"""Figures for the report, rendered with matplotlib (Agg).

Every function returns ``bytes`` of a PNG (``fmt="png"``, embedded base64 in the page) or of an
SVG (``fmt="svg"``, written beside the page for a paper's supplement). Legends sit outside the
axes, so they never cover a curve.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from cxrdistill.eval.detection import CocoResult  # noqa: E402
from cxrdistill.eval.froc import FrocResult  # noqa: E402

__all__ = ["pr_curves", "roc_curves", "froc_curves", "training_curves", "image_with_boxes"]


def _png(fig: plt.Figure, fmt: str = "png") -> bytes:
    """The figure as PNG or SVG bytes (closed afterwards); the legend outside is kept in the crop."""
    buf = io.BytesIO()
    if fmt == "svg":
        plt.rcParams["svg.hashsalt"] = "cxrdistill"  # stable ids: the same figure gives the same file
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    else:
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _legend_outside(ax: plt.Axes) -> None:
    """The legend to the right of the axes (only when something is labelled)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, borderaxespad=0)


def pr_curves(result: CocoResult, class_names: Sequence[str], iou: float, fmt: str = "png") -> bytes:
    """Precision vs recall (101 COCO recall points) per class at one IoU threshold, area all, max dets."""
    t = result._index(iou, "all", result.params.max_dets[-1])[0]
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for k, name in enumerate(class_names):
        p = result.precision[t, :, k, 0, -1]
        if (p > -1).any():
            ax.plot(result.params.rec_thresholds, p, label=f"{name} (AP {p.mean():.3f})")
    ax.set(xlabel="recall", ylabel="precision", title=f"PR @ IoU {iou:g}", xlim=(0, 1), ylim=(0, 1.02))
    _legend_outside(ax)
    return _png(fig, fmt)


def roc_curves(y_true: np.ndarray, scores: np.ndarray, class_names: Sequence[str], fmt: str = "png") -> bytes:
    """ROC per class from image-level truth and scores ``(N, C)``; undefined classes are skipped."""
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for k, name in enumerate(class_names):
        y = y_true[:, k]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, scores[:, k])
            ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="sensitivity", title="ROC (image level)", xlim=(0, 1), ylim=(0, 1.02))
    _legend_outside(ax)
    return _png(fig, fmt)


def froc_curves(curves: Mapping[str, FrocResult], xlabel: str = "false positives per image",
                log_x: bool = True, fmt: str = "png", operating_fp: float | None = None) -> bytes:
    """Sensitivity vs FPs (per image, or FP-pixel ratio) per class; dots at the evaluated rates."""
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for name, r in curves.items():
        if r.n_lesions:
            line, = ax.step(r.fp, r.sensitivity, where="post", label=f"{name} ({r.score:.3f})")
            ax.plot(r.rates, r.sensitivity_at_rates, "o", ms=3, color=line.get_color())
    if log_x:
        ax.set_xscale("log")
        rates = [x for r in curves.values() for x in r.rates]
        if rates:
            ax.set_xlim(min(rates) / 2, max(rates) * 2)
    if operating_fp is not None:
        ax.axvline(operating_fp, color="grey", lw=0.8, ls="--", label=f"operating point ({operating_fp:g} FP/image)")
    ax.set(xlabel=xlabel, ylabel="sensitivity", title="FROC", ylim=(0, 1.02))
    _legend_outside(ax)
    return _png(fig, fmt)


def training_curves(columns: Mapping[str, Sequence[float]], steps: Sequence[float],
                    stages: Sequence[str] | None = None, fmt: str = "png") -> bytes:
    """One panel per loss/metric column against step; stages in separate colours."""
    names = list(columns)
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.0 * len(names)), squeeze=False)
    steps_a = np.asarray(steps, dtype=float)
    stage_a = np.asarray(stages if stages is not None else [""] * len(steps_a))
    for ax, name in zip(axes[:, 0], names):
        vals = np.asarray(columns[name], dtype=float)
        for st in dict.fromkeys(stage_a.tolist()):
            sel = (stage_a == st) & ~np.isnan(vals)
            if sel.any():
                ax.plot(steps_a[sel], vals[sel], ".-", ms=2, label=st or None)
        ax.set_ylabel(name, fontsize=8)
        if len(set(stage_a.tolist())) > 1:
            _legend_outside(ax)
    axes[-1, 0].set_xlabel("step")
    return _png(fig, fmt)


GT_COLOUR, PRED_COLOUR = "lime", "red"


def image_with_boxes(image: np.ndarray, gt_boxes: np.ndarray, pred_boxes: np.ndarray, pred_scores: np.ndarray,
                     heatmap: np.ndarray | None = None, title: str = "", gt_labels: Sequence[str] | None = None,
                     pred_labels: Sequence[str] | None = None, fmt: str = "png") -> bytes:
    """An image ``(H, W)`` with GT boxes (green, class name) and predicted boxes (red, class name and
    score), an optional heat map, and a legend below the image.

    Boxes are ``(N, 4)`` xywh in the image's pixels; ``heatmap`` ``(h, w)`` is stretched over the image.
    """
    from matplotlib.patches import Patch

    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(4, 4 * h / max(w, 1)))
    ax.imshow(image, cmap="gray")
    if heatmap is not None:
        ax.imshow(heatmap, cmap="jet", alpha=0.35, extent=(0, w, h, 0), vmin=0, vmax=1)
    gt = np.asarray(gt_boxes).reshape(-1, 4)
    gt_labels = list(gt_labels) if gt_labels is not None else [""] * len(gt)
    for (x, y, bw, bh), name in zip(gt, gt_labels):
        ax.add_patch(plt.Rectangle((x, y), bw, bh, fill=False, color=GT_COLOUR, lw=1.5))
        if name:
            ax.text(x, y + bh, name, color="black", fontsize=7, va="top",
                    bbox={"facecolor": GT_COLOUR, "alpha": 0.75, "pad": 0.8, "lw": 0})
    pred = np.asarray(pred_boxes).reshape(-1, 4)
    scores = np.asarray(pred_scores).reshape(-1)
    pred_labels = list(pred_labels) if pred_labels is not None else [""] * len(pred)
    for (x, y, bw, bh), s, name in zip(pred, scores, pred_labels):
        ax.add_patch(plt.Rectangle((x, y), bw, bh, fill=False, color=PRED_COLOUR, lw=1))
        ax.text(x, y, f"{name} {s:.2f}".strip(), color="white", fontsize=7, va="bottom",
                bbox={"facecolor": PRED_COLOUR, "alpha": 0.75, "pad": 0.8, "lw": 0})
    ax.set_axis_off()
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    if title:
        ax.set_title(title, fontsize=8)
    ax.legend(handles=[Patch(fill=False, edgecolor=GT_COLOUR, label=f"ground truth ({len(gt)})"),
                       Patch(fill=False, edgecolor=PRED_COLOUR, label=f"prediction ({len(pred)})")],
              fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2, frameon=False)
    return _png(fig, fmt)
