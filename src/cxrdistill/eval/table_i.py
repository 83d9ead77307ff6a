"""Martins & Silva's Table I: macro AUROC of the teacher, the intermediate and the final student of
each generation, with bootstrap CIs and each student's paired difference from the teacher.

    table = table_one(results, split="test", tta=True, task="single_label", kappa=0.75, n_boot=1000)
    text = format_table_markdown(table)        # eval/table.md
    metrics = table_metrics(table)             # flat numbers for final_metrics.json

``results`` maps a row name (``teacher``, ``intermediate<g>``, ``student<g>``) to that stage's
evaluation: ``{"stage", "summary" (eval.classification.classification_summary), "scores" (N, K),
"truth" (N, K)}`` on the same images in the same order.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console

from cxrdistill.eval.compare import compare_auroc

COLUMNS = ("model", "stage", "macro AUROC [95% CI]", "Δ vs teacher [95% CI]")


def table_one(results: dict[str, dict[str, Any]], *, split: str, tta: bool, task: str, kappa: float,
              n_boot: int) -> dict[str, Any]:
    """Rows of Table I in the order of ``results`` (its ``teacher`` row first), with CIs, and each
    other row's paired-bootstrap difference from the teacher (seed 0, ``n_boot`` replicates)."""
    teacher = results["teacher"]
    rows = []
    for name, res in results.items():
        summary = res["summary"]
        row: dict[str, Any] = {
            "row": name, "stage": res["stage"], "macro_AUROC": summary["macro_AUROC"],
            "CI95": summary["macro_AUROC_CI95"], "n_images": summary["n_images"],
            "per_class": {k: v["AUROC"] for k, v in summary["per_class"].items()}}
        if name != "teacher":
            cmp = compare_auroc(teacher["truth"], teacher["scores"], res["scores"], n_boot=n_boot, seed=0)
            row["minus_teacher"] = _none_nan(cmp.diff)
            row["minus_teacher_CI95"] = [_none_nan(cmp.ci_low), _none_nan(cmp.ci_high)]
            row["p_boot"] = _none_nan(cmp.p_boot)
        rows.append(row)
    return {"split": split, "tta": tta, "task": task, "kappa": kappa, "n_boot": n_boot, "rows": rows}


def _none_nan(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _fmt(value: float | None, ci: list[float | None] | None = None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def _cells(row: dict[str, Any]) -> tuple[str, str, str, str]:
    delta = _fmt(row.get("minus_teacher"), row.get("minus_teacher_CI95"), signed=True) \
        if "minus_teacher" in row else "—"
    return row["row"], row["stage"], _fmt(row["macro_AUROC"], row["CI95"]), delta


def format_table_markdown(table: dict[str, Any]) -> str:
    """Table I as Markdown: one row per stage, macro AUROC [95% CI] and the paired Δ vs the teacher."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in table["rows"]]
    return "\n".join(lines)


def print_table(console: Console, table: dict[str, Any]) -> None:
    """Table I on the console (rich)."""
    from rich.table import Table

    out = Table(title=f"Table I — macro AUROC on {table['split']!r} (TTA {'on' if table['tta'] else 'off'})")
    for column in COLUMNS:
        out.add_column(column)
    for row in table["rows"]:
        out.add_row(*_cells(row))
    console.print(out)


def table_metrics(table: dict[str, Any]) -> dict[str, float]:
    """Flat metrics of every row as a stage (`methods.kit.headline`'s names): ``<row>/macro_AUROC`` (+
    ``_ci_low`` / ``_ci_high``) and ``<row>/delta_teacher/macro_AUROC`` (+ CI), the row − teacher Δ
    (undefined values: NaN)."""
    out: dict[str, float] = {}
    for row in table["rows"]:
        name = row["row"]
        out[f"{name}/macro_AUROC"] = _nan(row["macro_AUROC"])
        out[f"{name}/macro_AUROC_ci_low"], out[f"{name}/macro_AUROC_ci_high"] = map(_nan, row["CI95"])
        if "minus_teacher" in row:
            delta = f"{name}/delta_teacher/macro_AUROC"
            out[delta] = _nan(row["minus_teacher"])
            out[f"{delta}_ci_low"], out[f"{delta}_ci_high"] = map(_nan, row["minus_teacher_CI95"])
    return out


__all__ = ["format_table_markdown", "print_table", "table_metrics", "table_one"]
