"""The study tables: rows × labeled fractions, mean over seeds with a CI, and the paired
difference from the baseline row; one table per metric of the study's ``metrics``.

Numbers, per (row, fraction):

- **mean and 95% CI over seeds** of the headline metric read from each cell's
  ``final_metrics.json``. ``ci="t"``: ``mean ± t(0.975, n-1) · s / √n`` (Student t; needs n ≥ 2).
  ``ci="bootstrap"``: the 2.5/97.5 percentiles of the mean of ``n`` seeds drawn with replacement
  (coarse for 3 seeds: it cannot be wider than the range of the values).
- **Δ vs own teacher** (distillation recipes, whose runs keep ``eval_teacher/`` and
  ``teacher_comparison.json``, both written by `methods.kit`): the same paired
  bootstrap between the run's final model and its own supervised teacher on the same test images.
  Since the teacher is the shared supervised stage, it is the baseline row's checkpoint when the
  schedules match, and the two Δ agree.
- **pseudo-boxes per unlabeled image** of the distillation rows (``pseudo``), the seed mean of
  `study.pseudo_counts.pseudo_label_summary`: why a recipe did or did not help.
- **Δ vs baseline**: a paired bootstrap over *test images* (`eval.compare.paired_stats`). For each
  seed the baseline and the recipe ran on the same labeled subset and are scored on the same
  resampled image sets; the replicate difference is averaged over the seeds both have, so Δ is
  the seed-mean difference and its CI / ``p_boot`` reflect the finite test set (the seed spread
  is in the first interval). ``mAP``/``mAP@t`` use each cell's ``eval/predictions.json``;
  ``macro_AUROC`` uses ``eval/image_scores.json`` (else the max box score). Other metrics (e.g.
  ``modified_froc``, another stage's ``student/macro_AUROC``) get the seed statistics only.

Metric names are `methods.kit.headline`'s (the same for every recipe). A run folder written before
the names were unified (issue 18) holds the old keys: :func:`old_names` maps a metric to them
(:data:`RENAMED`), so a finished study still builds its table.

A difference is **claimed** (``*`` in the tables, coloured in the report, "helped" / "hurt" in the
demo) only when its paired CI over test images excludes zero *and*, with two seeds or more, its
interval over seeds (``seed_ci``) excludes zero on the same side: :func:`claimed_direction`.

A row whose finished cells lack a metric shows it as missing (``—``, ``"missing"`` in the JSON);
a metric no finished cell has is an error (a typo in the study file).

``table.json`` is the headline metric's table; with several metrics it also holds ``tables``:
every metric's table (the same layout), and ``table.md`` has one section per metric.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table
from scipy import stats

from cxrdistill.errors import CxrDistillError
from cxrdistill.eval.classification import bootstrap_indices, macro_auroc_replicates
from cxrdistill.eval.compare import PairedComparison, paired_stats
from cxrdistill.eval.detection import CocoParams, accumulate, match_detections
from cxrdistill.eval.predictions import (
    GroundTruth,
    image_labels,
    image_scores_from_boxes,
    load_ground_truth,
    load_image_scores,
    load_predictions,
)
from cxrdistill.study.pseudo_counts import format_summary, mean_summary, pseudo_label_summary
from cxrdistill.study.spec import Cell, StudySpec, fraction_tag


def seed_interval(values: Sequence[float], method: str = "t", n_boot: int = 1000,
                  seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of ``values`` (one per seed); the bounds are NaN with fewer than 2 values."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    if method == "t":
        half = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
        return mean, mean - half, mean + half
    if method == "bootstrap":
        means = np.random.default_rng(seed).choice(x, size=(n_boot, x.size), replace=True).mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        return mean, float(low), float(high)
    raise CxrDistillError(f"unknown CI method {method!r}: use 't' or 'bootstrap'")


class MissingMetric(CxrDistillError):
    """A finished cell has no value of the metric asked for."""


def pairable(metric: str) -> bool:
    """Whether the paired bootstrap over test images can score ``metric`` from a run's eval files."""
    if metric in ("mAP", "macro_AUROC"):
        return True
    if not metric.startswith("mAP@"):
        return False
    try:
        float(metric.split("@", 1)[1])
    except ValueError:
        return False
    return True


RENAMED: dict[str, str] = {
    "modified_froc": "mFROC", "modified_froc_ci_low": "mFROC_lo", "modified_froc_ci_high": "mFROC_hi",  # AALS
    "macro_AUROC": "AUROC", "macro_AUROC_ci_low": "AUROC_lo", "macro_AUROC_ci_high": "AUROC_hi",  # AALS, CEIRD reports
    "mAP_ci_low": "mAP_lo", "mAP_ci_high": "mAP_hi",  # OXnet
}
"""New metric name → its key in run folders written before issue 18, for the name after any
``<stage>/`` prefix (``teacher/modified_froc`` ← ``teacher/mFROC``). Besides these, teacher–student
classification's Table I rows: ``<row>/macro_AUROC[_ci_low|_ci_high]`` ← ``<row>_auroc[…]``,
``<row>/delta_teacher/macro_AUROC[…]`` ← ``<row>_minus_teacher[…]``; OXnet's ``data/n_<kind>`` ← ``n_<kind>``."""

_TABLE_I_ROW = re.compile(r"(?P<row>[A-Za-z]+\d*)/(?P<delta>delta_teacher/)?macro_AUROC(?P<ci>_ci_low|_ci_high)?")


def old_names(metric: str) -> list[str]:
    """The keys ``metric`` had in older run folders (see :data:`RENAMED`), most specific first."""
    out = []
    match = _TABLE_I_ROW.fullmatch(metric)
    if match is not None:
        ci = match["ci"] or ""
        out.append(f"{match['row']}_minus_teacher{ci}" if match["delta"] else f"{match['row']}_auroc{ci}")
    stage, _, name = metric.rpartition("/")
    if name in RENAMED and not stage.endswith("delta_teacher"):  # a Δ was never named the old way
        out.append(f"{stage}/{RENAMED[name]}" if stage else RENAMED[name])
    if stage == "data" and name.startswith("n_"):
        out.append(name)
    return out


def read_metric(cell: Cell, metric: str) -> float | None:
    """The cell's value of ``metric`` from final_metrics.json (None when the cell is not finished;
    `MissingMetric` when it is finished but has no such metric). A run folder from before the
    metric names were unified is read under the metric's old key (:func:`old_names`)."""
    path = cell.run_dir / "final_metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text(encoding="utf-8"))
    if metric not in metrics:  # an older run folder: the metric under its old key
        metric = next((old for old in old_names(metric) if old in metrics), metric)
    if metric not in metrics:
        # a recipe that reports other IoUs (OXnet) is scored on its predictions, like the paired test
        value = metric_from_predictions(cell.run_dir, metric) if pairable(metric) else None
        if value is None:
            raise MissingMetric(f"{path}: has no metric {metric!r} (has: {', '.join(metrics)}) and the run has "
                                "no eval/predictions.json to compute it from; set the study's metric")
        return value
    value = metrics[metric]
    return math.nan if value is None else float(value)


def metric_from_predictions(run_dir: Path, metric: str) -> float | None:
    """``metric`` (mAP, mAP@<iou>, macro_AUROC) of a run computed from its eval/ files; None without them."""
    if not (run_dir / "eval" / "predictions.json").is_file() or not (run_dir / "eval" / "metrics.json").is_file():
        return None
    gt, metrics = _ground_truth(run_dir)
    ious = {float(t) for t in (metrics.get("detection") or {}).get("iou_thresholds") or (0.25, 0.5, 0.75)}
    iou = None if metric in ("mAP", "macro_AUROC") else _iou_of(metric)
    params = CocoParams(iou_thresholds=tuple(sorted(ious | ({iou} if iou is not None else set()))))
    value, _ = _replicates(run_dir, gt, metric, np.zeros((0, len(gt.image_ids)), dtype=int), params)
    return math.nan if value is None else float(value)


# ----------------------------------------------------------------------------- paired comparison


def _ground_truth(run_dir: Path) -> tuple[GroundTruth, dict[str, Any]]:
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    metrics_path = run_dir / "eval" / "metrics.json"
    if not metrics_path.is_file():
        raise CxrDistillError(f"{run_dir}: no eval/metrics.json for the paired comparison")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    manifest = (config.get("data") or {}).get("manifest")
    if not manifest:
        raise CxrDistillError(f"{run_dir}/config.yaml: no data.manifest")
    return load_ground_truth(manifest, split=metrics.get("split", "test")), metrics


def _iou_of(metric: str) -> float | None:
    if metric == "mAP":
        return None
    try:
        return float(metric.split("@", 1)[1])
    except (IndexError, ValueError):
        raise CxrDistillError(f"metric {metric!r}: paired comparison needs mAP, mAP@<iou> or macro_AUROC") from None


def _replicates(run_dir: Path, gt: GroundTruth, metric: str, idx: np.ndarray,
                params: CocoParams, eval_name: str = "eval") -> tuple[float, np.ndarray]:
    """The metric on all test images and on each resampled image set ``idx (R, N)``, from the
    run's ``eval_name`` folder (``eval``: the final model; ``eval_teacher``: its own teacher)."""
    if metric == "macro_AUROC":
        y, mask = image_labels(gt)
        scores_path = run_dir / eval_name / "image_scores.json"
        if scores_path.is_file():
            scores = load_image_scores(scores_path, gt)
        else:
            scores = image_scores_from_boxes(load_predictions(run_dir / eval_name / "predictions.json", gt).rows, gt)
        keep = np.flatnonzero(mask)
        _, full = macro_auroc_replicates(y[keep], scores[keep], np.arange(len(keep))[None])
        _, boot = macro_auroc_replicates(y[keep], scores[keep], idx[:, : len(keep)] % len(keep))
        return float(full[0]), boot
    rows = load_predictions(run_dir / eval_name / "predictions.json", gt).rows
    match = match_detections(gt, rows, params)
    iou = _iou_of(metric)
    full = accumulate(match, main_only=True).ap(iou)
    return float(full), np.array([accumulate(match, i, main_only=True).ap(iou) for i in idx])


def paired_over_seeds(pairs: Sequence[tuple[Path, Path]], metric: str, n_boot: int = 1000,
                      seed: int = 0, cache: dict | None = None,
                      eval_names: tuple[str, str] = ("eval", "eval")) -> PairedComparison:
    """Paired bootstrap over test images of recipe B − baseline A, averaged over seed pairs ``(A_dir, B_dir)``.

    All pairs must be scored on the same test images (one manifest and split). ``cache`` (a dict
    the caller keeps) holds each run's replicates, so a baseline compared with every other recipe
    is resampled once. ``eval_names``: the evaluation folders of A and B (``("eval_teacher",
    "eval")`` with A = B compares a run's final model with its own teacher).
    """
    if not pairs:
        raise CxrDistillError("paired comparison: no seed has both runs finished")
    gt, metrics = _ground_truth(pairs[0][0])
    ious = tuple((metrics.get("detection") or {}).get("iou_thresholds") or (0.25, 0.5, 0.75))
    if metric not in ("mAP", "macro_AUROC") and _iou_of(metric) not in {float(t) for t in ious}:
        ious = tuple(sorted({float(t) for t in ious} | {_iou_of(metric)}))  # e.g. OXnet's runs
    params = CocoParams(iou_thresholds=tuple(float(t) for t in ious))
    idx = bootstrap_indices(len(gt.image_ids), n_boot, seed)
    a_full, b_full, a_boot, b_boot = [], [], [], []
    cache = {} if cache is None else cache

    def replicates(run_dir: Path, eval_name: str) -> tuple[float, np.ndarray]:
        key = (str(run_dir), eval_name, metric, n_boot, seed, ious)
        if key not in cache:
            cache[key] = _replicates(run_dir, gt, metric, idx, params, eval_name)
        return cache[key]

    for base_dir, other_dir in pairs:
        a, ba = replicates(base_dir, eval_names[0])
        b, bb = replicates(other_dir, eval_names[1])
        a_full.append(a), b_full.append(b), a_boot.append(ba), b_boot.append(bb)
    return paired_stats(metric, float(np.mean(a_full)), float(np.mean(b_full)),
                        np.mean(a_boot, axis=0), np.mean(b_boot, axis=0), seed)


def paired_with_seed_interval(pairs: Sequence[tuple[Path, Path]], metric: str, spec: StudySpec, cache: dict,
                              eval_names: tuple[str, str] = ("eval", "eval")) -> dict[str, Any]:
    """`paired_over_seeds` of ``pairs`` as a table entry, plus each seed's own Δ (``seed_diffs``) and,
    with two seeds or more, an interval over seeds of the mean Δ (``seed_ci``, the study's `ci`):
    the first says how sure the Δ is over test images, the second over seeds."""
    cmp = paired_over_seeds(pairs, metric, spec.n_boot, cache=cache, eval_names=eval_names)
    out: dict[str, Any] = {**cmp.to_dict(), "seeds": len(pairs)}
    if len(pairs) > 1:
        diffs = [paired_over_seeds([pair], metric, spec.n_boot, cache=cache, eval_names=eval_names).diff
                 for pair in pairs]
        _, low, high = seed_interval(diffs, spec.ci, spec.n_boot)
        out["seed_diffs"] = [_j(d) for d in diffs]
        out["seed_ci"] = [_j(low), _j(high)]
    return out


# ----------------------------------------------------------------------------- the table


def build_table(spec: StudySpec, cells: Sequence[Cell]) -> dict[str, Any]:
    """The study's tables as a JSON-ready dict: the headline metric's table, and with several
    metrics every metric's table under ``tables`` (see the module docstring for the statistics)."""
    replicates: dict = {}  # bootstrap replicates per (run, metric), computed once
    tables = {metric: metric_table(spec, cells, metric, replicates) for metric in spec.metrics}
    table = dict(tables[spec.metric])
    if len(tables) > 1:
        table["tables"] = tables
    return table


def metric_table(spec: StudySpec, cells: Sequence[Cell], metric: str, replicates: dict | None = None) -> dict[str, Any]:
    """One metric's table: per row and fraction the seed mean and CI, Δ vs the baseline row and vs
    the row's own teacher (paired bootstrap, for `pairable` metrics)."""
    by_key = {(c.recipe, c.fraction, c.seed): c for c in cells}
    base = spec.baseline_name
    rows = []
    replicates = {} if replicates is None else replicates
    paired = pairable(metric)
    missing: list[MissingMetric] = []
    found = 0
    compare_to = {name: r.compare_to for name, r in spec.table_rows.items()}
    for recipe in spec.table_rows:
        row: dict[str, Any] = {"recipe": recipe, "label": spec.label(recipe), "fractions": {}}
        for fraction in spec.fractions:
            values, lacking = {}, []
            if fraction not in spec.row_fractions(recipe):
                row["fractions"][fraction_tag(fraction)] = {"n_seeds": 0, "values": {}, "mean": None,
                                                            "ci": [None, None], "run_dirs": {}, "not_run": True}
                continue
            for s in spec.seeds:
                try:
                    value = read_metric(by_key[(recipe, fraction, s)], metric)
                except MissingMetric as err:
                    missing.append(err)
                    lacking.append(s)
                    continue
                if value is not None:
                    values[s] = value
            found += len(values)
            done = values
            mean, low, high = seed_interval(list(done.values()), spec.ci, spec.n_boot)
            entry: dict[str, Any] = {"n_seeds": len(done), "values": done, "mean": _j(mean), "ci": [_j(low), _j(high)],
                                     "run_dirs": {s: str(by_key[(recipe, fraction, s)].run_dir) for s in done}}
            if lacking:
                entry["missing"] = lacking
            references = {"vs_baseline": base, "vs_reference": compare_to[recipe]}
            for key, other in references.items():
                if other is None or other == recipe or not paired:
                    continue
                pairs = [(by_key[(other, fraction, s)].run_dir, by_key[(recipe, fraction, s)].run_dir)
                         for s in done if by_key[(other, fraction, s)].done]
                scored = [(a, b) for a, b in pairs if has_scores(a, metric) and has_scores(b, metric)]
                if scored:
                    entry[key] = {**paired_with_seed_interval(scored, metric, spec, replicates), "row": other}
                elif pairs:  # e.g. a classifier task other than multi-label: no per-image scores to resample
                    entry[f"{key}_note"] = "no per-image scores of this metric to pair"
            compared = [by_key[(recipe, fraction, s)].run_dir for s in done
                        if (by_key[(recipe, fraction, s)].run_dir / "teacher_comparison.json").is_file()] if paired else []
            own = [(d, d) for d in compared if has_scores(d, metric, TEACHER_EVAL) and has_scores(d, metric)]
            if own and len(own) == len(compared):  # student − its own teacher, on the same test images
                entry["vs_teacher"] = paired_with_seed_interval(own, metric, spec, replicates,
                                                                (TEACHER_EVAL, "eval"))
            elif compared:  # the recipe scored its teacher itself (no per-image files): its recorded Δ
                recorded = recorded_teacher_delta(compared, metric, spec.ci, spec.n_boot)
                if recorded is not None:
                    entry["vs_teacher"] = recorded
            pseudo = mean_summary([pseudo_label_summary(by_key[(recipe, fraction, s)].run_dir) for s in done])
            if pseudo is not None:
                entry["pseudo"] = pseudo
            row["fractions"][fraction_tag(fraction)] = entry
        rows.append(row)
    if missing and not found:
        raise missing[0]
    splits = sorted({eval_split(c.run_dir) for c in cells if c.done})
    out = {"study": spec.name, "metric": metric, "baseline": base, "ci": spec.ci, "n_boot": spec.n_boot,
           "fractions": [fraction_tag(f) for f in spec.fractions], "fraction_key": spec.fraction_key,
           "seeds": list(spec.seeds), "rows": rows, "eval_split": " / ".join(splits) or "test"}
    if spec.axis is not None:
        out["axis"] = spec.axis
    return out


def eval_split(run_dir: Path) -> str:
    """The split a finished run scored (its ``config.yaml``'s ``method.params.eval_split``; ``test``
    when it names none)."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        split = config.get("method", {}).get("params", {}).get("eval_split")
    except (OSError, yaml.YAMLError, AttributeError):
        return "test"
    return str(split) if split else "test"


def has_scores(run_dir: Path, metric: str, eval_name: str = "eval") -> bool:
    """Whether the run's ``eval_name`` folder holds the per-image files the paired bootstrap of
    `metric` resamples (predictions.json; for macro_AUROC image_scores.json also does)."""
    folder = run_dir / eval_name
    if metric == "macro_AUROC" and (folder / "image_scores.json").is_file():
        return True
    return (folder / "predictions.json").is_file()


def recorded_teacher_delta(run_dirs: Sequence[Path], metric: str, ci: str = "t",
                           n_boot: int = 1000) -> dict[str, Any] | None:
    """Δ vs own teacher as each run recorded it (``delta_teacher/<metric>`` in teacher_comparison.json,
    e.g. teacher–student classification on a binary task, whose scores are not per class): one seed
    keeps its paired-bootstrap CI; several get the mean Δ and an interval over seeds."""
    deltas, records = [], []
    for run_dir in run_dirs:
        record = json.loads((run_dir / "teacher_comparison.json").read_text(encoding="utf-8"))
        if record.get(f"delta_teacher/{metric}") is None:
            return None
        deltas.append(float(record[f"delta_teacher/{metric}"]))
        records.append(record)
    if len(records) == 1:
        r = records[0]
        low, high, p = (r.get(f"delta_teacher/{metric}_{k}") for k in ("ci_low", "ci_high", "p_boot"))
        return {"metric": metric, "diff": deltas[0], "ci_low": low, "ci_high": high, "p_boot": p,
                "seeds": 1, "source": "teacher_comparison.json"}
    mean, low, high = seed_interval(deltas, ci, n_boot)
    return {"metric": metric, "diff": _j(mean), "ci_low": _j(low), "ci_high": _j(high), "p_boot": None,
            "seeds": len(deltas), "source": "teacher_comparison.json (interval over seeds)"}


TEACHER_EVAL = "eval_teacher"
"""A distillation run's evaluation of its own teacher (`methods.kit.evaluate_stage`)."""


def _j(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def format_mean(entry: dict[str, Any]) -> str:
    """``mean ± CI half-width`` of a table entry (``(n=k)`` when fewer than two seeds finished)."""
    if entry["mean"] is None:
        return "—"
    low, high = entry["ci"]
    text = f"{entry['mean']:.3f}"
    if low is not None:
        text += f" ± {(high - low) / 2:.3f}"
    return text + ("" if entry["n_seeds"] > 1 else f" (n={entry['n_seeds']})")


def claimed_direction(cmp: dict[str, Any] | None) -> int:
    """+1 / -1 when a paired Δ is claimed as a gain / a loss, else 0.

    Claimed: the CI over test images (``ci_low``/``ci_high``; ``p_boot < 0.05`` where a comparison
    has no CI) excludes zero, and, when the Δ has an interval over seeds (two seeds or more), that
    excludes zero on the same side too.
    """
    if not cmp or cmp.get("diff") is None:
        return 0
    low, high = cmp.get("ci_low"), cmp.get("ci_high")
    if low is not None and high is not None:
        images = 1 if low > 0 else (-1 if high < 0 else 0)
    else:
        p = cmp.get("p_boot")
        images = 0 if p is None or p >= 0.05 else (1 if cmp["diff"] > 0 else -1)
    seed_low, seed_high = cmp.get("seed_ci") or (None, None)
    if images == 0 or seed_low is None or seed_high is None:
        return images
    seeds = 1 if seed_low > 0 else (-1 if seed_high < 0 else 0)
    return images if seeds == images else 0


CLAIM_RULE = ("* the paired CI over test images excludes zero and, with two seeds or more, so does the "
              "interval over seeds")


def format_delta(entry: dict[str, Any], against: str = "vs_baseline") -> str:
    """``Δ +d* [low, high], p=…`` of a table entry vs the baseline (``against="vs_teacher"``: vs its
    own teacher; ``"vs_reference"``: vs its `compare_to` row; "" without that comparison)."""
    cmp = entry.get(against)
    if not cmp or cmp.get("diff") is None:
        return ""
    p = cmp.get("p_boot")
    star = "*" if claimed_direction(cmp) else ""
    ci = f" [{cmp['ci_low']:+.3f}, {cmp['ci_high']:+.3f}]" if cmp.get("ci_low") is not None else ""
    ptxt = f", p={p:.3f}" if p is not None else ""
    low, high = cmp.get("seed_ci") or (None, None)
    seeds = f"; seeds [{low:+.3f}, {high:+.3f}]" if low is not None and high is not None else ""
    return f"Δ {cmp['diff']:+.3f}{star}{ci}{ptxt}{seeds}"


def axis_name(table: dict[str, Any]) -> str:
    """The fraction axis as tables name it (``labeled_fraction``, or the old ``boxed_fraction``)."""
    return table.get("axis") or table["fraction_key"].split(".")[-1]


def format_markdown(table: dict[str, Any]) -> str:
    """Per metric: mean ± CI half-width over seeds, Δ vs the baseline (paired bootstrap) and Δ vs own
    teacher; with several metrics one ``## metric`` section each."""
    if "tables" in table:
        return "\n\n".join(f"## {metric}\n\n{format_markdown(sub)}" for metric, sub in table["tables"].items())
    fr = table["fractions"]
    head = "| recipe | " + " | ".join(f"{axis_name(table)} {f[1:]}" for f in fr) + " |"
    sep = "|---|" + "---|" * len(fr)
    split = table.get("eval_split", "test")
    lines = [f"{table['metric']} on the {split} split: mean ± 95% CI half-width over seeds "
             f"({'Student t' if table['ci'] == 't' else 'bootstrap over seeds'}; seeds {table['seeds']})", "",
             head, sep]
    for row in table["rows"]:
        lines.append(f"| {row['label']} | " + " | ".join(format_mean(row["fractions"][f]) for f in fr) + " |")
    if pairable(table["metric"]):  # other metrics have no paired bootstrap: seed statistics only
        lines += ["", f"Δ {table['metric']} vs {table['baseline']} [95% CI], paired bootstrap over {split} images "
                      f"({table['n_boot']} replicates, difference averaged over seeds); with two seeds or more also "
                      f"`seeds [95% CI]` of the mean Δ over seeds; {CLAIM_RULE}", "", head, sep]
        for row in table["rows"]:
            if row["recipe"] == table["baseline"]:
                continue
            lines.append(f"| {row['label']} | " + " | ".join(format_delta(row["fractions"][f]) or "—" for f in fr)
                         + " |")
    referenced = [row for row in table["rows"] if any("vs_reference" in row["fractions"][f] for f in fr)]
    if referenced:
        labels = {row["recipe"]: row["label"] for row in table["rows"]}
        lines += ["", f"Δ {table['metric']} vs the row each recipe names (`compare_to`; paired bootstrap over test "
                      f"images, averaged over seeds; {CLAIM_RULE})", "", "| recipe | vs | " + head[len("| recipe | "):],
                  "|---|---|" + "---|" * len(fr)]
        for row in referenced:
            other = next(row["fractions"][f]["vs_reference"]["row"] for f in fr if "vs_reference" in row["fractions"][f])
            lines.append(f"| {row['label']} | {labels.get(other, other)} | " + " | ".join(
                format_delta(row["fractions"][f], "vs_reference") or "—" for f in fr) + " |")
    own = [row for row in table["rows"] if any("vs_teacher" in row["fractions"][f] for f in fr)]
    if own:
        lines += ["", f"Δ {table['metric']} vs own teacher (student − the recipe's own supervised teacher, same test "
                      f"images; paired bootstrap, averaged over seeds; {CLAIM_RULE})", "", head, sep]
        for row in own:
            lines.append(f"| {row['label']} | " + " | ".join(
                format_delta(row["fractions"][f], "vs_teacher") or "—" for f in fr) + " |")
    counted = [row for row in table["rows"] if any("pseudo" in row["fractions"][f] for f in fr)]
    if counted:
        lines += ["", "Pseudo-boxes the teacher gave the student, per unlabeled image (mean over seeds; offline "
                      "recipes: the boxes kept once and the share of unlabeled images with one; online: mean over "
                      "the training steps)", "", head, sep]
        for row in counted:
            lines.append(f"| {row['label']} | " + " | ".join(
                format_summary(row["fractions"][f].get("pseudo")) or "—" for f in fr) + " |")
    return "\n".join(lines)


def print_table(table: dict[str, Any], console: Console) -> None:
    """The table(s) on the console: one row per study row, mean ± CI and Δ vs baseline per fraction."""
    if "tables" in table:
        for sub in table["tables"].values():
            print_table(sub, console)
        return
    out = Table(title=f"{table['study']}: {table['metric']} (mean ± 95% CI over seeds; Δ vs {table['baseline']}, "
                      f"paired bootstrap over test images; 'teacher Δ': vs own teacher; {CLAIM_RULE})")
    out.add_column("recipe")
    for f in table["fractions"]:
        out.add_column(f"{axis_name(table)} {f[1:]}", justify="right")
    for row in table["rows"]:
        cells = []
        for f in table["fractions"]:
            entry = row["fractions"][f]
            delta = format_delta(entry)
            own = format_delta(entry, "vs_teacher")
            ref = format_delta(entry, "vs_reference")
            cells.append(format_mean(entry) + (f"\n{delta.split(' [')[0]}" if delta else "")
                         + (f"\nvs {entry['vs_reference']['row']} {ref.split(' [')[0]}" if ref else "")
                         + (f"\nteacher {own.split(' [')[0]}" if own else ""))
        out.add_row(row["label"], *cells)
    console.print(out)


def write_table(table: dict[str, Any], out_dir: Path) -> Path:
    """Write ``table.json`` and ``table.md`` into ``out_dir``; returns the Markdown path."""
    from cxrdistill.atomic import write_text_atomic

    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "table.json", json.dumps(table, indent=2) + "\n")
    path = out_dir / "table.md"
    write_text_atomic(path, format_markdown(table) + "\n")
    return path


__all__ = ["CLAIM_RULE", "MissingMetric", "axis_name", "build_table", "claimed_direction", "format_delta", "format_markdown", "format_mean",
           "metric_table", "old_names", "pairable", "paired_over_seeds", "paired_with_seed_interval", "print_table",
           "read_metric", "seed_interval", "write_table"]
