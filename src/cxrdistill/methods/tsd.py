"""Offline teacher-student detection (TSD), the baseline of CEIRD (Sun et al., MICCAI 2023, Eq. 2).

1. The teacher is the shared supervised stage (`kit.supervised_stage`): the same RetinaNet,
   augmentation and schedule as the `supervised_detector` baseline, so at the same seed it *is*
   the baseline's checkpoint (read from the stage store when one already trained it).
2. Its detections on every unlabeled image are computed once and kept in the pseudo-label store
   (``run_dir/pseudo/vision/generation_000``); a rerun reads them back instead of predicting again.
3. ``pseudo.selection`` turns them into per-class thresholds (the paper's τ =
   ``pseudo_score_thresh``, ``precision@P`` or ``topk_per_class``), and the collapse guard checks them.
4. A student, freshly initialised, learns from labeled images (real boxes) and unlabeled images
   (the selected teacher boxes), labeled:unlabeled 2:1 per batch:
   ``L = Σ_l [L_cls + L_reg] + Σ_u [L_cls(ŷ, y_pv) + L_reg(B̂, B_pv)]``.

The student sees randomly flipped and shifted views (the paper's "random cropping and flipping").
Both teacher and student are scored on the same test images; ``final_metrics.json`` holds the
student, its own teacher and the paired bootstrap Δ (student − teacher).
"""

from __future__ import annotations

from cxrdistill.atomic import write_json_atomic
from cxrdistill.config import RunConfig
from cxrdistill.data.study import StudyData
from cxrdistill.engine.context import RunContext
from cxrdistill.errors import ConfigError
from cxrdistill.methods.kit import (
    build_detector,
    headline,
    module_as,
    prefixed,
    supervised_stage,
    teacher_comparison,
    write_teacher_comparison,
)
from cxrdistill.methods.offline import (
    OfflineParams,
    PlainPseudoLabels,
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


class TsdParams(OfflineParams):
    """Vision teacher-student distillation; defaults follow CEIRD's implementation paragraph."""


@register_method("tsd", TsdParams)
def run(cfg: RunConfig, params: TsdParams, ctx: RunContext) -> dict[str, float]:
    """Teacher on labeled images → stored pseudo-boxes → student (Eq. 2); evaluate both, and Δ."""
    data = StudyData.from_config(cfg.data)
    sets = split_train(data)
    eval_set = data.dataset(params.eval_split, with_truth=True)
    if not len(eval_set):
        raise ConfigError(f"method.params.eval_split: split {params.eval_split!r} has no images")
    run_path = ctx.run_dir.path
    stage = supervised_stage(ctx, data, steps=params.teacher_steps, augment=params.teacher_augment)
    teacher = module_as(stage.model, RetinaNet)
    out = prefixed(evaluate_teacher(ctx, stage, eval_set, params, [run_path / "eval_teacher", run_path / "eval_vision_gen0"]),
                   "teacher")
    pseudo = stored_detections(ctx, teacher, sets, 0, fresh=stage.fresh, store_score_thresh=params.store_score_thresh,
                               topk_candidates=params.topk_candidates, batch_size=params.predict_batch_size)
    selection, collapse = select_pseudo_labels(ctx, teacher, sets, data, pseudo, params.pseudo_score_thresh,
                                               params.pseudo, topk_candidates=params.topk_candidates,
                                               batch_size=params.predict_batch_size)
    student = build_detector(cfg.model, data.num_classes, cfg.train.seed + 1)  # a new student, random init
    _, totals = distill_detector(ctx, "vision_gen1", student, sets, pseudo, selection.thresholds, params.schedule(),
                                 PlainPseudoLabels(data.class_names), cfg.train.seed + 1)
    if ctx.fabric.is_global_zero:
        write_json_atomic(run_path / "pseudo_counts.json", {"vision_gen1": totals.totals})
    metrics = evaluate_vision(student, eval_set, [run_path / "eval_vision_gen1", ctx.run_dir.eval],
                              split=params.eval_split, n_boot=params.n_boot, topk_candidates=params.topk_candidates,
                              batch_size=params.predict_batch_size)
    final = headline(metrics)
    out.update(prefixed(final, "student"))
    comparison = teacher_comparison(eval_set, params.eval_split, run_path / "eval_teacher", ctx.run_dir.eval,
                                    n_boot=params.n_boot)
    write_teacher_comparison(ctx, comparison, stage)
    out.update(comparison)
    out["pseudo/collapsed"] = float(collapse.collapsed)
    ctx.console.print(describe_delta("TSD", out), highlight=False)
    if ctx.fabric.is_global_zero:
        export_model(run_path / "model.pt", student, cfg.model, data.class_names, cfg.data.image_size)
    return {**out, **final}  # unprefixed keys: the run's final model (the student)


__all__ = ["TsdParams", "run"]
