"""The collapse guard: notice when a teacher's pseudo-labels (almost) vanish, and say so.

A fixed score threshold that does not transfer (a weak teacher at τ 0.3, a paper's τ 0.9 on a
CPU-scale model) can leave every unlabeled image without a box; the student then learns
"background everywhere" without a word. :func:`check_collapse` looks at the pseudo-boxes that
pass the selection on the unlabeled set and flags a collapse when

- fewer than ``min_image_fraction`` (default 5 %) of the unlabeled images get any box, or
- a class present in the labeled set gets no box at all.

The report carries the per-class counts and the quantiles of the teacher's stored scores per
class, so the message shows how far off the thresholds are. :func:`guard` prints it as a
warning, or raises :class:`PseudoLabelCollapse` with ``on_collapse="stop"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cxrdistill.errors import CxrDistillError

if TYPE_CHECKING:
    from rich.console import Console

QUANTILES = (0.5, 0.9, 0.99, 1.0)


class PseudoLabelCollapse(CxrDistillError):
    """The pseudo-labels collapsed and ``pseudo.on_collapse`` is ``stop``."""


@dataclass
class CollapseReport:
    """What the guard saw on the unlabeled set."""

    n_images: int
    images_with_box: int
    kept_per_class: dict[str, int]
    labeled_classes: list[str]
    score_quantiles: dict[str, dict[str, float | None]]
    thresholds: dict[str, float | None]
    reasons: list[str] = field(default_factory=list)

    @property
    def collapsed(self) -> bool:
        return bool(self.reasons)

    def message(self, where: str = "") -> str:
        head = f"{where}: " if where else ""
        counts = ", ".join(f"{n} {k}" for n, k in self.kept_per_class.items())
        quant = "; ".join(f"{n}: " + " ".join(f"q{int(100 * float(q))}={_fmt(v)}" for q, v in qs.items())
                          for n, qs in self.score_quantiles.items())
        thr = ", ".join(f"{n} {_fmt(t)}" for n, t in self.thresholds.items())
        return (f"{head}pseudo-labels collapsed: " + "; ".join(self.reasons)
                + f". Boxes kept per class: {counts} ({self.images_with_box}/{self.n_images} unlabeled images "
                f"with any box). Thresholds: {thr}. Teacher score quantiles per class: {quant}.")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "collapsed": self.collapsed}


def _fmt(value: float | None) -> str:
    return "none" if value is None or (isinstance(value, float) and math.isinf(value)) else f"{value:.3f}"


def score_quantiles(dets: Sequence[Mapping[str, Tensor]], class_names: Sequence[str],
                    quantiles: Sequence[float] = QUANTILES) -> dict[str, dict[str, float | None]]:
    """Per class, quantiles of the stored detection scores (None when the class has no detection)."""
    out: dict[str, dict[str, float | None]] = {}
    for k, name in enumerate(class_names):
        s = [d["scores"][d["labels"].long() == k].float() for d in dets]
        scores = torch.cat(s) if s else torch.zeros(0)
        out[name] = {f"{q:g}": (float(torch.quantile(scores, q)) if len(scores) else None) for q in quantiles}
    return out


def check_collapse(dets: Sequence[Mapping[str, Tensor]], thresholds: Tensor, class_names: Sequence[str],
                   labeled_classes: Sequence[str], *, min_image_fraction: float = 0.05) -> CollapseReport:
    """Count the pseudo-boxes passing ``thresholds (C,)`` in ``dets`` (one entry per unlabeled image)."""
    kept = dict.fromkeys(class_names, 0)
    with_box = 0
    for d in dets:
        labels = d["labels"].long()
        keep = d["scores"].float() >= thresholds.to(d["scores"].device)[labels] if len(labels) else labels.bool()
        with_box += bool(keep.any())
        for k in labels[keep].tolist():
            kept[class_names[k]] += 1
    report = CollapseReport(len(dets), with_box, kept, list(labeled_classes), score_quantiles(dets, class_names),
                            {n: (None if math.isinf(float(t)) else float(t)) for n, t in zip(class_names, thresholds)})
    if dets and with_box < min_image_fraction * len(dets):
        report.reasons.append(f"only {with_box} of {len(dets)} unlabeled images "
                              f"({with_box / len(dets):.1%}) get any pseudo-box (floor {min_image_fraction:.0%})")
    empty = [n for n in labeled_classes if kept.get(n, 0) == 0]
    if dets and empty:
        report.reasons.append("class" + ("es " if len(empty) > 1 else " ") + ", ".join(repr(n) for n in empty)
                              + " (present in the labeled set) get no pseudo-box")
    return report


def guard(report: CollapseReport, on_collapse: str, console: Console | None = None, where: str = "") -> None:
    """Warn (console) about a collapse, or raise :class:`PseudoLabelCollapse` when ``on_collapse == "stop"``."""
    if not report.collapsed:
        return
    text = report.message(where)
    if on_collapse == "stop":
        raise PseudoLabelCollapse(text + " Stopped (pseudo.on_collapse=stop). Try "
                                  "method.params.pseudo.selection=precision@0.8 (per-class thresholds "
                                  "calibrated on the validation split) or topk_per_class.")
    if console is not None:
        from rich.markup import escape

        console.print(f"[bold yellow]warning:[/] {escape(text)} Consider method.params.pseudo.selection=precision@0.8.",
                      highlight=False, soft_wrap=True)


__all__ = ["CollapseReport", "PseudoLabelCollapse", "check_collapse", "guard", "score_quantiles"]
