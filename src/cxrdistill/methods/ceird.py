"""CEIRD: co-evolutionary image and report distillation (Sun et al., MICCAI 2023, Sec. 2).

Data: labeled images with boxes (their box classes double as report labels, ``{y_l}``) and
unlabeled image + report pairs (supervision "none" images keep their ``report``).

- **Report TSD** (Eq. 1): a teacher report classifier on labeled reports; a student on labeled
  reports and the teacher's pseudo-labels of the unlabeled reports (cross-entropy), 1:1.
- **Vision TSD** (Eq. 2, the offline pattern of :mod:`cxrdistill.methods.offline`): a fixed teacher RetinaNet's pseudo-boxes
  on unlabeled images, labeled:unlabeled 2:1 per batch.
- **SA-NMS**: per mini-batch, NMS over the teacher's pseudo-boxes ∪ the student's current
  predictions, so the maturing student's confident boxes rectify the teacher's.
- **RPDLR** (Eq. 3): keep only pseudo-boxes whose class the report classifier finds in the paired
  report (semi-oracle: the ground-truth labels instead of the classifier).
- **APCLR**: keep only report pseudo-labels whose class the vision student detects in the image.
- **Co-evolution** (Fig. 2): generation 0 trains both teachers on labeled data only. Generation
  k ≥ 1 first trains the language student ``R_k`` from teacher ``R_{k-1}`` (refined by APCLR with
  the frozen vision model ``V_{k-1}`` when k ≥ 2; ``V_0`` is no student, so ``R_1`` is plain Eq. 1),
  then the vision student ``V_k`` from teacher ``V_{k-1}``, refined by SA-NMS and by RPDLR with the
  frozen ``R_k``. ``V_k`` then becomes the next vision teacher and ``R_k`` the next report teacher.
  Students are reborn (fresh random weights, a new seed) every generation. K = 2.

Every model's predictions on the unlabeled set are kept, one generation per directory
(``pseudo/vision/generation_k``, ``pseudo/report/generation_k``), so a rerun skips finished stages
and never predicts again. Switches (``method.params``) give the paper's ablation: ``rpdlr``,
``generations`` (1 = no co-evolution), ``apclr``, ``sa_nms``, ``rpdlr_source: oracle``.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from rich.table import Table
from torch import Tensor

from cxrdistill.atomic import write_json_atomic
from cxrdistill.config import RunConfig
from cxrdistill.data.study import StudyData
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.sampler import RatioBatchSampler
from cxrdistill.errors import ConfigError
from cxrdistill.eval.runs import evaluate_image_scores
from cxrdistill.methods.kit import (
    DETECTION_KEYS,
    build_detector,
    headline,
    module_as,
    prefixed,
    record_tensor,
    supervised_stage,
    teacher_comparison,
    write_teacher_comparison,
)
from cxrdistill.methods.offline import (
    Detections,
    OfflineParams,
    TrainSets,
    class_counts,
    describe_delta,
    distill_detector,
    evaluate_teacher,
    evaluate_vision,
    select_pseudo_labels,
    split_train,
    stored_detections,
)
from cxrdistill.methods.registry import register_method
from cxrdistill.models.detector import RetinaNet
from cxrdistill.models.factory import export_model
from cxrdistill.models.report import (
    CalibratedReportClassifier,
    TfidfReportClassifier,
    TransformerReportClassifier,
    calibrate_report_classifier,
    expected_calibration_error,
)
from cxrdistill.pseudo.report_filter import (
    detections_to_presence,
    filter_boxes_by_image_labels,
    filter_labels_by_detections,
)
from cxrdistill.pseudo.sa_nms import self_adaptive_nms_batch
from cxrdistill.pseudo.store import PseudoLabelStore
from cxrdistill.pseudo.thresholds import filter_detections


class CeirdParams(OfflineParams):
    """CEIRD's switches and settings; defaults are the paper's full method (Table 2, column c)."""

    generations: int = Field(2, ge=1)
    """K, generations of co-evolution (2 in the paper, Fig. 3); 1 = no co-evolution."""
    sa_nms: bool = True
    sa_nms_iou: float = Field(0.5, gt=0.0, lt=1.0)
    sa_nms_score_thresh: float | None = Field(None, gt=0.0, lt=1.0)
    """Student predictions scoring at least this join the teacher's pseudo-boxes in SA-NMS (None: the
    teacher's ``pseudo_score_thresh`` — the paper gives one confidence rule for both roles)."""
    rpdlr: bool = True
    rpdlr_source: Literal["report_model", "oracle"] = "report_model"
    """"oracle": RPDLR from the ground-truth labels (the paper's semi-oracle; the synthetic world's truth)."""
    apclr: bool = True
    apclr_score_thresh: float = Field(0.5, gt=0.0, lt=1.0)
    """A class is detected in an image when the vision model has a box of it scoring at least this."""
    report_thresh: float = Field(0.5, gt=0.0, lt=1.0)
    """A report classifier's class is present (pseudo-label 1, kept by RPDLR) at this probability."""
    report_model: Literal["tfidf", "transformer"] = "tfidf"
    """TF-IDF + logistic regression (CPU speed), or a fine-tuned transformer (paper: BERT-base)."""
    report_calibration: Literal["platt", "isotonic", "none"] | None = None
    """Calibrate the report classifier's probabilities on the labeled reports (out-of-fold) before
    RPDLR / APCLR threshold them at ``report_thresh`` (None: platt for tfidf; none for the
    transformer, whose cross-fitting would train it ``report_calibration_folds`` more times)."""
    report_calibration_folds: int = Field(5, ge=2)
    report_options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the report classifier (e.g. ``encoder_dir`` for the transformer)."""
    report_steps: int = Field(2000, ge=1)
    report_batch_size: int = Field(16, ge=2)
    report_lr: float = Field(1e-4, gt=0.0)
    """Transformer only: steps, batch (labeled:unlabeled 1:1) and learning rate (paper: 2000, 16, 1e-4)."""


# ===================================================================================== report side


@dataclass
class ReportSets:
    """Reports of the training images: labeled ones with their box classes, unlabeled ones by image id."""

    labeled_texts: list[str]
    labeled_targets: np.ndarray  # (N_l, C)
    unlabeled_ids: list[int]  # unlabeled images that have a report
    unlabeled_texts: list[str]
    without_report: list[int]  # unlabeled images without a report (RPDLR leaves them alone)


def report_sets(data: StudyData, sets: TrainSets) -> ReportSets:
    """Split the training reports; labeled images without a report raise naming them."""
    images = sets.dataset.images
    missing = [images[i].id for i in sets.labeled if not (images[i].report or "").strip()]
    if missing:
        raise ConfigError(f"CEIRD: labeled images without a report (their classes are the report labels): {missing[:20]}")
    texts = [images[i].report or "" for i in sets.labeled]  # none is empty (`missing` above)
    targets = np.stack([data.manifest.image_labels(images[i].id) for i in sets.labeled]).astype(np.float64)
    ids, unl_texts, without = [], [], []
    for i in sets.unlabeled:
        report = images[i].report or ""
        if report.strip():
            ids.append(images[i].id)
            unl_texts.append(report)
        else:
            without.append(images[i].id)
    return ReportSets(texts, targets, ids, unl_texts, without)


def report_pseudo_targets(teacher_probs: Tensor, detected: Tensor | None, thresh: float) -> Tensor:
    """Report pseudo-labels ``(N, C)`` 0/1: the teacher's classes (prob >= thresh), refined by APCLR
    (``detected (N, C)`` bool: the classes the frozen vision model detects) when given."""
    hard = (teacher_probs >= thresh).float()
    return hard if detected is None else filter_labels_by_detections(hard, detected)


def fit_report_model(ctx: RunContext, stage: str, params: CeirdParams, reports: ReportSets,
                     num_classes: int, pseudo: Tensor | None) -> tuple[Any, bool]:
    """Train a report classifier on labeled reports (+ unlabeled reports with ``pseudo`` targets,
    weighted 1:1 like the paper's batches); saved under ``checkpoints/<stage>/report_model``.
    Returns the model and whether it was trained in this run."""
    directory = ctx.run_dir.stage_dir(stage) / "report_model"
    done = directory / "config.json"
    cls = TfidfReportClassifier if params.report_model == "tfidf" else TransformerReportClassifier
    if done.is_file() and ctx.cfg.train.resume:
        return CalibratedReportClassifier.wrap_if_calibrated(cls.load(directory), directory), False
    texts, targets = list(reports.labeled_texts), reports.labeled_targets
    n_l, n_u = len(texts), 0 if pseudo is None else len(reports.unlabeled_texts)
    weights = np.ones(n_l)
    if n_u and pseudo is not None:  # n_u is 0 without pseudo
        texts += reports.unlabeled_texts
        targets = np.concatenate([targets, pseudo.cpu().numpy().astype(np.float64)])
        weights = np.concatenate([np.full(n_l, 1.0 / n_l), np.full(n_u, 1.0 / n_u)]) * (n_l + n_u) / 2
    if params.report_model == "tfidf":
        model: TfidfReportClassifier | TransformerReportClassifier = TfidfReportClassifier(
            num_classes=num_classes, **params.report_options).fit(texts, targets, weights)
    else:
        model = _fit_transformer(ctx, stage, params, texts, targets, n_l, num_classes)
    calibration = params.report_calibration or ("platt" if params.report_model == "tfidf" else "none")
    if calibration != "none":  # out-of-fold on the labeled reports, each fold model fitted like `model`
        if params.report_model != "tfidf":
            raise ConfigError("method.params.report_calibration: cross-fitted calibration is implemented for "
                              "the tfidf report model; set report_calibration: none for the transformer")

        def fit_fold(rows: np.ndarray) -> TfidfReportClassifier:
            keep = np.concatenate([rows, np.arange(n_l, n_l + n_u)]).astype(int)
            w = weights[keep] * len(keep) / weights[keep].sum()
            return TfidfReportClassifier(num_classes=num_classes, **params.report_options).fit(
                [texts[i] for i in keep], targets[keep], w)

        model = calibrate_report_classifier(model, fit_fold, texts[:n_l], reports.labeled_targets, calibration,
                                            params.report_calibration_folds, ctx.cfg.train.seed)
    if ctx.fabric.is_global_zero:
        shutil.rmtree(directory, ignore_errors=True)
        model.save(directory)  # config.json is written last: its presence marks the stage done
    ctx.fabric.barrier()
    return model, True


def _fit_transformer(ctx: RunContext, stage: str, params: CeirdParams, texts: list[str], targets: np.ndarray,
                     n_labeled: int, num_classes: int) -> TransformerReportClassifier:
    """Eq. (1) with the transformer: CE on labeled and pseudo-labeled reports, 1:1 per batch."""
    from cxrdistill.engine.optim import build_optimizer

    model = TransformerReportClassifier(num_classes=num_classes, **params.report_options)
    half = params.report_batch_size // 2
    n_unlabeled = len(texts) - n_labeled
    sampler = RatioBatchSampler(range(n_labeled), range(n_labeled, len(texts)), half if n_unlabeled else 2 * half,
                                half, ctx.cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size)
    y = torch.as_tensor(targets, dtype=torch.float32)
    batches = ({**model.tokenize([texts[i] for i in rows]), "targets": y[rows]} for rows in sampler)
    optimizer = build_optimizer(model.parameters(), ctx.cfg.train.model_copy(update={"lr": params.report_lr}))
    ctx.trainer(stage).fit(lambda batch, _: {"ce": model.training_step(batch)}, {"model": model}, optimizer,
                           batches, params.report_steps, sampler=sampler)
    return model.eval()


def stored_report_probs(ctx: RunContext, model: Any, reports: ReportSets, generation: int, fresh: bool) -> Tensor:
    """``(N_u, C)`` probabilities of generation ``generation``'s report model on the unlabeled reports,
    predicted once and kept in ``pseudo/report/generation_k`` (see :func:`offline.stored_detections`)."""
    store = PseudoLabelStore(ctx.run_dir.path / "pseudo" / "report", generation)
    if ctx.fabric.is_global_zero:
        if fresh and store.path.exists():
            shutil.rmtree(store.path)
        if not store.is_complete():
            done = store.done_ids()
            todo = [(i, t) for i, t in zip(reports.unlabeled_ids, reports.unlabeled_texts) if i not in done]
            with store.writer(chunk_size=512) as writer:
                for start in range(0, len(todo), 512):
                    part = todo[start:start + 512]
                    probs = model.predict_proba([t for _, t in part])
                    for (image_id, _), p in zip(part, probs):
                        writer.add(image_id, np.asarray(p, dtype=np.float32))
            store.mark_complete(expected_ids=reports.unlabeled_ids)
    ctx.fabric.barrier()
    records = store.read()
    num_classes = int(model.num_classes)
    if not reports.unlabeled_ids:
        return torch.zeros(0, num_classes)
    return torch.stack([record_tensor(records[i]) for i in reports.unlabeled_ids]).float()


def evaluate_report(model: Any, data: StudyData, split: str, out_dir: Path, n_boot: int) -> dict[str, Any]:
    """AUROC (per class, macro, bootstrap CI) of the report classifier on the reports of ``split``,
    against the images' true labels."""
    dataset = data.dataset(split)
    with_report = [im for im in dataset.images if (im.report or "").strip()]
    dataset.images = with_report
    probs = model.predict_proba([im.report for im in with_report])
    metrics = evaluate_image_scores([im.id for im in with_report], np.asarray(probs), dataset, out_dir,
                                    split=split, n_boot=n_boot)
    truth = np.stack([data.manifest.image_labels(im.id) for im in with_report]) if with_report else None
    metrics["calibration"] = {"ECE": expected_calibration_error(np.asarray(probs), truth) if truth is not None
                              else math.nan, "fit": getattr(model, "summary", None)}
    return metrics


# ===================================================================================== vision side


@dataclass
class CeirdPseudoLabels:
    """The vision pseudo-label path of generation k: SA-NMS, then RPDLR (Eq. 3).

    ``present``: image id → ``(C,)`` bool, the classes found in its report (by the frozen language
    student, or the truth for the semi-oracle); None switches RPDLR off. Images missing from it
    (no report) keep all their boxes.
    """

    class_names: list[str]
    sa_nms: bool
    sa_nms_iou: float
    sa_nms_score_thresh: float
    present: dict[int, Tensor] | None

    @property
    def needs_student(self) -> bool:
        return self.sa_nms

    def __call__(self, teacher: list[Detections], student: list[Detections] | None,
                 image_ids: list[int]) -> tuple[list[Detections], dict[str, dict[str, int]]]:
        counts = {"teacher": class_counts(teacher, self.class_names)}
        boxes = teacher
        if self.sa_nms:
            if student is None:
                raise ValueError("SA-NMS needs the student's current predictions")
            boxes = self_adaptive_nms_batch(teacher, student, self.sa_nms_iou, self.sa_nms_score_thresh)
            counts["sa_nms"] = class_counts(boxes, self.class_names)
        if self.present is not None:
            c = len(self.class_names)
            present = torch.stack([self.present.get(i, torch.ones(c, dtype=torch.bool)) for i in image_ids])
            boxes = filter_boxes_by_image_labels(boxes, present)
            counts["rpdlr"] = class_counts(boxes, self.class_names)
        return boxes, counts


def report_presence(reports: ReportSets, probs: Tensor, thresh: float) -> dict[int, Tensor]:
    """Image id → classes (bool ``(C,)``) the report classifier finds in the image's report."""
    return {i: p >= thresh for i, p in zip(reports.unlabeled_ids, probs)}


def oracle_presence(data: StudyData, sets: TrainSets) -> dict[int, Tensor]:
    """Image id → the image's true classes (the semi-oracle's "ground-truth report labels")."""
    return {i: torch.from_numpy(data.manifest.image_labels(i) >= 0.5) for i in sets.unlabeled_ids}


def detected_classes(reports: ReportSets, dets: dict[int, Detections], num_classes: int, thresh: float) -> Tensor:
    """``(N_u, C)`` bool, per unlabeled report, the classes the vision model detects in its image."""
    return detections_to_presence([dets[i] for i in reports.unlabeled_ids], num_classes, thresh)


# ===================================================================================== the recipe


def _static_counts(dets: dict[int, Detections], ids: list[int], thresholds: Tensor, names: list[str],
                   present: dict[int, Tensor] | None) -> dict[str, dict[str, int]]:
    """Teacher pseudo-boxes per class on the whole unlabeled set, before and after RPDLR (no SA-NMS:
    that one needs the student and is counted per batch); ``thresholds (C,)`` per class."""
    boxes = filter_detections([dets[i] for i in ids], thresholds)
    out = {"teacher": class_counts(boxes, names)}
    if present is not None:
        c = len(names)
        mask = torch.stack([present.get(i, torch.ones(c, dtype=torch.bool)) for i in ids]) if ids else torch.zeros(0, c, dtype=torch.bool)
        out["rpdlr"] = class_counts(filter_boxes_by_image_labels(boxes, mask), names)
    return out


def _report_counts(targets_before: Tensor, targets_after: Tensor, names: list[str]) -> dict[str, dict[str, int]]:
    return {"teacher": dict(zip(names, targets_before.sum(0).long().tolist())),
            "apclr": dict(zip(names, targets_after.sum(0).long().tolist()))}


def _flat_report(metrics: dict[str, Any]) -> dict[str, float]:
    out = {**headline(metrics), "ECE": metrics.get("calibration", {}).get("ECE", math.nan)}
    fit = metrics.get("calibration", {}).get("fit") or {}
    if "ECE_before" in fit:  # on the labeled reports, out-of-fold, before / after calibration
        out.update(ECE_labeled_before=fit["ECE_before"], ECE_labeled_after=fit["ECE_after"])
    return out


@register_method("ceird", CeirdParams)
def run(cfg: RunConfig, params: CeirdParams, ctx: RunContext) -> dict[str, float]:
    """Generation 0 teachers, then K generations of report and vision students (see module docstring)."""
    data = StudyData.from_config(cfg.data)
    names = data.class_names
    sets = split_train(data)
    eval_set = data.dataset(params.eval_split, with_truth=True)
    if not len(eval_set):
        raise ConfigError(f"method.params.eval_split: split {params.eval_split!r} has no images")
    use_reports = params.rpdlr and params.rpdlr_source == "report_model"
    reports = report_sets(data, sets) if use_reports else None
    if reports is not None and reports.without_report:
        ctx.console.print(f"CEIRD: {len(reports.without_report)} unlabeled images have no report; RPDLR keeps their boxes")
    summary: dict[str, Any] = {"params": params.model_dump(mode="json"), "generations": []}
    run_path = ctx.run_dir.path

    # generation 0: both teachers on labeled data only
    stage = supervised_stage(ctx, data, steps=params.teacher_steps, augment=params.teacher_augment)
    vision, fresh = module_as(stage.model, RetinaNet), stage.fresh
    gen: dict[str, Any] = {"generation": 0, "vision": evaluate_teacher(
        ctx, stage, eval_set, params, [run_path / "eval_teacher", run_path / "eval_vision_gen0"])}
    if reports is not None:
        report, r_fresh = fit_report_model(ctx, "report_gen0", params, reports, data.num_classes, None)
        gen["report"] = _flat_report(evaluate_report(report, data, params.eval_split, run_path / "eval_report_gen0",
                                                     params.n_boot))
        report_probs = stored_report_probs(ctx, report, reports, 0, r_fresh)
    summary["generations"].append(gen)
    teacher_dets = _stored(ctx, vision, sets, 0, params, fresh)
    collapses = {}

    student = vision  # V_{k-1}: the supervised teacher, then each generation's student
    for k in range(1, params.generations + 1):
        gen = {"generation": k, "counts": {}}
        present = oracle_presence(data, sets) if params.rpdlr and params.rpdlr_source == "oracle" else None
        if reports is not None:  # language student k from teacher R_{k-1}, APCLR by the frozen V_{k-1}
            detected = None
            if params.apclr and k >= 2:
                detected = detected_classes(reports, teacher_dets, data.num_classes, params.apclr_score_thresh)
            targets = report_pseudo_targets(report_probs, detected, params.report_thresh)
            gen["counts"]["report_pseudo_labels"] = _report_counts(
                report_pseudo_targets(report_probs, None, params.report_thresh), targets, names)
            report, r_fresh = fit_report_model(ctx, f"report_gen{k}", params, reports, data.num_classes, targets)
            gen["report"] = _flat_report(evaluate_report(report, data, params.eval_split,
                                                         run_path / f"eval_report_gen{k}", params.n_boot))
            report_probs = stored_report_probs(ctx, report, reports, k, r_fresh)
            present = report_presence(reports, report_probs, params.report_thresh)
        teacher_model = student  # V_{k-1}
        selection, collapse = select_pseudo_labels(ctx, teacher_model, sets, data, teacher_dets,
                                                   params.pseudo_score_thresh, params.pseudo,
                                                   topk_candidates=params.topk_candidates,
                                                   batch_size=params.predict_batch_size, name=f"vision_gen{k - 1}",
                                                   out_name=f"pseudo_selection_gen{k}.json")
        collapses[f"vision_gen{k - 1}"] = collapse.to_dict()
        gen["pseudo_selection"] = selection.to_dict()
        gen["counts"]["vision_pseudo_boxes_offline"] = _static_counts(teacher_dets, sets.unlabeled_ids,
                                                                      selection.thresholds, names, present)
        # vision student k, reborn, distilled from the frozen V_{k-1} with SA-NMS and RPDLR by R_k
        student = build_detector(cfg.model, data.num_classes, cfg.train.seed + k)
        student_thresh = params.pseudo_score_thresh if params.sa_nms_score_thresh is None else params.sa_nms_score_thresh
        refiner = CeirdPseudoLabels(names, params.sa_nms, params.sa_nms_iou, student_thresh, present)  # one knob per role
        result, totals = distill_detector(ctx, f"vision_gen{k}", student, sets, teacher_dets, selection.thresholds,
                                          params.schedule(), refiner, cfg.train.seed + k)
        gen["counts"]["vision_pseudo_boxes_per_batch"] = totals.totals
        final = k == params.generations
        out_dirs = [run_path / f"eval_vision_gen{k}"] + ([ctx.run_dir.eval] if final else [])
        gen["vision"] = headline(evaluate_vision(
            student, eval_set, out_dirs, split=params.eval_split, n_boot=params.n_boot,
            topk_candidates=params.topk_candidates, batch_size=params.predict_batch_size))
        summary["generations"].append(gen)
        if not final:  # V_k, frozen, is the next teacher and drives APCLR for R_{k+1}
            teacher_dets = _stored(ctx, student, sets, k, params, not result.skipped or fresh)
        _write(ctx, run_path / "ceird_summary.json", summary)

    comparison = teacher_comparison(eval_set, params.eval_split, run_path / "eval_teacher", ctx.run_dir.eval,
                                    n_boot=params.n_boot)
    write_teacher_comparison(ctx, comparison, stage)
    summary["vs_own_teacher"] = comparison
    summary["collapse"] = collapses
    _write(ctx, run_path / "ceird_summary.json", summary)
    _write(ctx, run_path / "pseudo_counts.json", {f"generation_{g['generation']}": g.get("counts", {})
                                                  for g in summary["generations"]})
    print_summary(ctx, summary)
    out = {**flat_metrics(summary), **comparison,
           "pseudo/collapsed": float(any(c["collapsed"] for c in collapses.values()))}
    ctx.console.print(describe_delta(f"CEIRD (generation {params.generations})", out), highlight=False)
    if ctx.fabric.is_global_zero:
        export_model(run_path / "model.pt", student, cfg.model, data.class_names, cfg.data.image_size)
    return out


def _stored(ctx: RunContext, model: RetinaNet, sets: TrainSets, generation: int, params: CeirdParams,
            fresh: bool) -> dict[int, Detections]:
    return stored_detections(ctx, model, sets, generation, fresh=fresh, store_score_thresh=params.store_score_thresh,
                             topk_candidates=params.topk_candidates, batch_size=params.predict_batch_size)


def _write(ctx: RunContext, path: Path, payload: Any) -> None:
    if ctx.fabric.is_global_zero:
        write_json_atomic(path, payload)


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Every generation's models as stages: ``vision_gen{k}/<headline>`` (``teacher/<headline>``: the
    generation-0 teacher) and ``report_gen{k}/macro_AUROC`` (+ CI, ``ECE``), then the final student's
    headline unprefixed."""
    out: dict[str, float] = prefixed(summary["generations"][0]["vision"], "teacher")
    for gen in summary["generations"]:
        k = gen["generation"]
        out.update(prefixed(gen["vision"], f"vision_gen{k}"))
        if "report" in gen:
            out.update(prefixed(gen["report"], f"report_gen{k}"))
    out.update(summary["generations"][-1]["vision"])
    return out


def print_summary(ctx: RunContext, summary: dict[str, Any]) -> None:
    """One row per generation: the vision model's mAPs and the report model's AUROC (Fig. 3)."""
    table = Table(title="CEIRD per generation (generation 0 = teachers on labeled data only)")
    for column in ("generation", *DETECTION_KEYS, "report AUROC"):
        table.add_column(column, justify="right")
    for gen in summary["generations"]:
        auroc = gen.get("report", {}).get("macro_AUROC")
        table.add_row(str(gen["generation"]), *(f"{gen['vision'][m]:.4f}" for m in DETECTION_KEYS),
                      "-" if auroc is None else f"{auroc:.4f}")
    ctx.console.print(table)


__all__ = [
    "CeirdParams", "CeirdPseudoLabels", "ReportSets", "detected_classes", "evaluate_report", "fit_report_model",
    "flat_metrics", "oracle_presence", "report_presence", "report_pseudo_targets", "report_sets", "run",
    "stored_report_probs",
]
