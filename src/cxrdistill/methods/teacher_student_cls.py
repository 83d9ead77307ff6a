"""Teacher–student semi-supervised classification (Martins & Silva, "On Teacher-Student
Semi-Supervised Learning for Chest X-ray Image Classification"), with generations.

Sec. III-A. The training split's images with image labels (supervision "box" or "image") are the
labeled set D (N_l = λN; choose λ with ``data.boxed_fraction``), those with supervision "none" the
unlabeled set U (N_u = (1 − λ)N). One generation g:

1) Train the teacher θ^t on D with cross-entropy. It is the **shared supervised classifier stage**
   (`methods.kit.supervised_stage`, stage ``classifier``): the same function, seeded initialisation,
   augmentation and schedule as the ``supervised_classifier`` baseline, so with task
   ``multi_label`` and the same schedule the baseline of that data *is* this teacher (one
   checkpoint in the stage store, trained once). Other tasks train that stage with their own head.
2) Classify U with θ^t (ten-crop TTA optional), producing the labels L; stored once per
   generation in ``pseudo/generation_<g-1>``.
3) Filter L (Sec. III-B): keep the best K = κ·N_u predictions, per class in D's class proportions
   (`pseudo.top_kappa.class_balanced_top_kappa`, κ = 0.75).
4) Train the student θ^s on U's kept pseudo-labels only ("intermediate")      stage ``student<g>_pseudo``
5) Fine-tune the student on D                                                  stage ``student<g>_finetune``

Steps 4) and 5) run through the shared supervised loop (`methods.kit.fit_on`). With
``generations > 1`` the student becomes the next teacher (the teacher–student chain of Shaw et al.,
the paper's future work). Every student starts from the teacher's initial weights ("all models
starting from the same pre-trained model", Fig. 3), unless ``student_init="teacher"``.

Targets: `data.targets` (tasks ``multi_label`` / ``single_label`` / ``any_finding``) and
`data.target_dataset` (D and the kept pseudo-labels). Evaluation: AUROC per output (one-vs-rest
for the softmax tasks), macro mean, seeded bootstrap CI, on ``eval_split`` after every stage
(`eval.task_scores`, ten-crop TTA of `eval.tta`, Sec. IV-C); Table I (`eval.table_i`) compares each
intermediate and final student with the generation-0 teacher by a paired bootstrap. The run writes
``eval/<stage>/{metrics.json, scores.npz}``, ``eval/pseudo_gen<g>.json`` (what the filter kept),
``eval/table.{json,md}``, the teacher's ``eval_teacher/`` and the final student's ``eval/``
(``metrics.json``, ``image_scores.json``), and ``teacher_comparison.json`` (student − own teacher).

Stage lengths are epochs of that stage's training set (paper: 25 / 10 / 15), or ``teacher_steps``
optimizer steps for the teacher; ``train.max_steps`` is not used by this recipe. Optimizer and schedule come from ``train`` (paper: Adam, lr 1e-4,
×0.9 per epoch: ``schedule: exp``, ``exp_gamma: 0.9``, one decay per epoch of each stage).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from cxrdistill.atomic import write_json_atomic, write_text_atomic
from cxrdistill.config import RunConfig
from cxrdistill.data.dataset import CXRDataset
from cxrdistill.data.study import StudyData
from cxrdistill.data.target_dataset import TargetDataset, selection_report
from cxrdistill.data.targets import ClassificationTask, Task
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.optim import with_epoch_length
from cxrdistill.errors import ConfigError, CxrDistillError
from cxrdistill.eval.table_i import format_table_markdown, print_table, table_metrics, table_one
from cxrdistill.eval.task_scores import score_task, write_image_scores
from cxrdistill.eval.tta import DEFAULT_CROP_FRACTION, predict_with_tta
from cxrdistill.methods.kit import (
    Augment,
    Stage,
    build_classifier_model,
    fit_on,
    headline,
    print_metrics,
    record_tensor,
    supervised_stage,
    write_teacher_comparison,
)
from cxrdistill.methods.registry import register_method
from cxrdistill.models.factory import export_model
from cxrdistill.pseudo.generate import stored_pseudo_labels
from cxrdistill.pseudo.store import PseudoLabelStore
from cxrdistill.pseudo.top_kappa import class_balanced_top_kappa

TEACHER_STAGE = "classifier"
"""The teacher's stage: the ``supervised_classifier`` baseline's, so that both are one checkpoint."""
AUGMENT: dict[str, Augment] = {"martins_silva": "strong", "flip": "flip", "none": "none"}


def _box_and_image() -> list[Literal["box", "image"]]:
    return ["box", "image"]


class Params(BaseModel):
    """`method.params` of ``teacher_student_cls``; defaults are the paper's values."""

    model_config = ConfigDict(extra="forbid")

    task: Task = "single_label"
    """How image labels become targets (`data.targets`). The paper: single label (Effusion vs none)."""
    normal_class: bool = True
    """single_label: add a "(no finding)" class for images without any class."""
    kappa: float = Field(0.75, ge=0.0, le=1.0)
    """Fraction of U kept as pseudo-labels (Sec. III-B; 0.75 was best in Fig. 2)."""
    soft_labels: bool = False
    """Train on the teacher's probabilities instead of hard labels (paper: hard; soft is future work)."""
    redistribute: bool = False
    """False (the paper's rule): each class keeps at most its labeled-share quota. True: hand a short
    class's unused quota to the other classes (see `pseudo.top_kappa`; breaks the class balance)."""
    generations: int = Field(1, ge=1)
    """Teacher → student rounds; the paper runs one."""
    teacher_epochs: float = Field(25.0, gt=0)
    teacher_steps: int | None = Field(None, ge=1)
    """The teacher's optimizer steps instead of ``teacher_epochs`` (e.g. the ``train.max_steps`` of the
    ``supervised_classifier`` baseline whose checkpoint it should share at every labeled fraction)."""
    pseudo_epochs: float = Field(10.0, gt=0)
    finetune_epochs: float = Field(15.0, gt=0)
    augment: Literal["martins_silva", "flip", "none"] = "martins_silva"
    """Training augmentation of every stage (the shared views of `methods.kit.view_config`): the
    paper's list (flip, ±25°, 15 % shift, ×0.9–1.1, perspective 0.2), flips only, or none."""
    intensity: float = Field(0.0, ge=0.0, le=1.0)
    """Extra intensity jitter: not offered by the shared supervised stage's views; must stay 0."""
    pseudo_tta: bool = False
    """Ten-crop TTA when pseudo-labelling U (the paper states TTA for validation and test only)."""
    eval_tta: bool = True
    """Ten-crop TTA when evaluating (Sec. IV-C)."""
    crop_fraction: float = Field(DEFAULT_CROP_FRACTION, gt=0.0, le=1.0)
    """Side of a TTA crop relative to the image (paper: 224 / 256)."""
    student_init: Literal["initial", "teacher"] = "initial"
    labeled_supervision: list[Literal["box", "image"]] = Field(default_factory=_box_and_image)
    """Images of D: every image with image labels (the shared supervised stage's labeled set)."""
    train_split: str = "train"
    eval_split: str = "test"
    n_boot: int = Field(1000, ge=10)
    predict_batch_size: int = Field(32, gt=0)


@register_method("teacher_student_cls", Params)
def run(cfg: RunConfig, params: Params, ctx: RunContext) -> dict[str, float]:
    """The whole recipe on the data `cfg.data` describes; returns the Table I numbers."""
    return run_on_data(cfg, params, ctx, StudyData.from_config(cfg.data))


def run_on_data(cfg: RunConfig, params: Params, ctx: RunContext, data: StudyData) -> dict[str, float]:
    """Sec. III-A on already opened ``data`` (``cfg.data.manifest`` must name its manifest file: the
    teacher's stage key hashes it)."""
    _check(params)
    if cfg.data.manifest is None:
        raise ConfigError("data.manifest: run_on_data needs the file of the opened data's manifest (the shared "
                          "teacher stage is keyed by its content); save the manifest and set data.manifest")
    task = ClassificationTask(data.class_names, params.task, params.normal_class)
    labeled, unlabeled, held_out = _split_sets(data, params)
    labeled_set = TargetDataset.labeled(labeled, task)
    augment = AUGMENT[params.augment]

    # 1) the teacher θ^t on D: the shared supervised classifier stage
    teacher_steps = params.teacher_steps or _steps(ctx, params.teacher_epochs, len(labeled_set))
    stage = supervised_stage(_epoch_ctx(ctx, len(labeled_set)), data, kind="classifier", steps=teacher_steps,
                             augment=augment, split=params.train_split, stage=TEACHER_STAGE,
                             head=None if params.task == "multi_label" else task)
    teacher, fresh_teacher = stage.model, stage.fresh
    results = {"teacher": _evaluate(ctx, TEACHER_STAGE, teacher, held_out, task, params, reuse=not stage.fresh)}

    for gen in range(1, params.generations + 1):
        # 2) classify U with the teacher (stored once per generation)
        store = PseudoLabelStore(ctx.run_dir.path / "pseudo", gen - 1)
        ids, probs = predict_unlabeled(ctx, teacher, unlabeled, store, task, params, recompute=fresh_teacher)
        # 3) keep the best K = κ·N_u, per class in D's proportions
        selection = class_balanced_top_kappa(probs, params.kappa, labeled_set.class_proportions(),
                                             mode=task.kappa_mode, soft=params.soft_labels,
                                             redistribute=params.redistribute)
        pseudo_set = TargetDataset.pseudo(unlabeled, ids, selection, task)
        if ctx.fabric.is_global_zero:
            write_json_atomic(ctx.run_dir.eval / f"pseudo_gen{gen}.json", selection_report(
                unlabeled, ids, selection, task, kappa=params.kappa, soft=params.soft_labels), indent=2)
        # 4) the student θ^s on U's kept pseudo-labels only
        student = build_classifier_model(cfg.model, task.num_outputs, cfg.train.seed)  # θ^t's initial weights
        if params.student_init == "teacher":
            student.load_state_dict(teacher.state_dict())
        stage_name = f"student{gen}_pseudo"
        skipped = _train(ctx, stage_name, student, pseudo_set, params.pseudo_epochs, task, augment)
        results[f"intermediate{gen}"] = _evaluate(ctx, stage_name, student, held_out, task, params, skipped)
        # 5) fine-tune the student on D
        stage_name = f"student{gen}_finetune"
        skipped = _train(ctx, stage_name, student, labeled_set, params.finetune_epochs, task, augment)
        results[f"student{gen}"] = _evaluate(ctx, stage_name, student, held_out, task, params, skipped)
        teacher, fresh_teacher = student, not skipped

    return _report(ctx, cfg, params, stage, task, held_out, results, final=teacher)


# ============================================================================ data and stages


def _check(params: Params) -> None:
    if params.intensity:
        raise ConfigError("method.params.intensity: the shared supervised stage's views (methods.kit.view_config) "
                          "have no intensity jitter, and the teacher trains through that stage; set it to 0")
    if set(params.labeled_supervision) != {"box", "image"}:
        raise ConfigError("method.params.labeled_supervision: the teacher is the shared supervised classifier "
                          "stage, trained on every image with image labels ('box' and 'image'); to leave the "
                          "image-only ones out, set data.weak_fraction=0 instead")


def _split_sets(data: StudyData, params: Params) -> tuple[CXRDataset, CXRDataset, CXRDataset]:
    """(D, U, held-out): labeled and unlabeled images of the training split, and the eval split."""
    labeled = data.dataset(params.train_split, supervision=params.labeled_supervision)
    unlabeled = data.dataset(params.train_split, supervision="none")
    held_out = data.dataset(params.eval_split)
    counts = data.counts()
    if not len(labeled):
        raise ConfigError(f"split {params.train_split!r} has no labeled image (supervision "
                          f"{params.labeled_supervision}); images per split/supervision: {counts}")
    if not len(unlabeled):
        raise ConfigError(f"split {params.train_split!r} has no unlabeled image (supervision 'none'): nothing "
                          f"for the teacher to pseudo-label. Set data.boxed_fraction (e.g. 0.1) to hide the "
                          f"labels of the rest; images per split/supervision: {counts}")
    if not len(held_out):
        raise ConfigError(f"method.params.eval_split: split {params.eval_split!r} has no image; "
                          f"images per split/supervision: {counts}")
    return labeled, unlabeled, held_out


def _steps(ctx: RunContext, epochs: float, n_images: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``n_images`` images (at least one)."""
    return max(1, math.ceil(epochs * n_images / ctx.cfg.train.batch_size))


def _epoch_ctx(ctx: RunContext, n_images: int) -> RunContext:
    """``ctx`` whose ``train.steps_per_epoch`` is one pass over ``n_images`` (the exp schedule decays per epoch)."""
    return replace(ctx, cfg=ctx.cfg.model_copy(update={"train": with_epoch_length(ctx.cfg.train, n_images)}))


def _train(ctx: RunContext, stage: str, model: nn.Module, dataset: TargetDataset, epochs: float,
           task: ClassificationTask, augment: Augment) -> bool:
    """Train ``model`` on ``dataset``'s targets for ``epochs`` epochs (the shared loop); True when the
    stage was already finished in this run folder (skipped)."""
    if not len(dataset):
        raise CxrDistillError(f"stage {stage!r}: no training image (an empty pseudo-label set? raise kappa)")
    fit = fit_on(_epoch_ctx(ctx, len(dataset)), stage, model, dataset, list(range(len(dataset))),  # type: ignore[arg-type]
                 augment, task.target_losses(model), _steps(ctx, epochs, len(dataset)))
    return fit.skipped


def predict_unlabeled(ctx: RunContext, teacher: nn.Module, unlabeled: CXRDataset, store: PseudoLabelStore,
                      task: ClassificationTask, params: Params, recompute: bool) -> tuple[list[int], Tensor]:
    """Teacher probabilities ``(N_u, K)`` on U, from the store when this generation is complete.

    ``recompute``: the teacher was (re)trained in this run, so stored labels of an earlier teacher
    are stale and removed. A killed pass resumes, skipping the images already stored.
    """
    def predict(batch: dict[str, Any]) -> Tensor:
        return predict_with_tta(lambda x: task.probabilities(teacher(x)), batch["image"].to(ctx.device),
                                tta=params.pseudo_tta, crop_fraction=params.crop_fraction).float()

    teacher.eval()
    records = stored_pseudo_labels(predict, unlabeled, store, fresh=recompute, fabric=ctx.fabric,
                                   metadata={"task": task.task, "outputs": task.output_names,
                                             "tta": params.pseudo_tta},
                                   batch_size=params.predict_batch_size,
                                   chunk_size=4 * params.predict_batch_size)
    ids = [rec.id for rec in unlabeled.images]
    return ids, torch.stack([record_tensor(records[i]) for i in ids]).float()


# ============================================================================ evaluation


def _evaluate(ctx: RunContext, stage: str, model: nn.Module, held_out: CXRDataset, task: ClassificationTask,
              params: Params, reuse: bool) -> dict[str, Any]:
    """Held-out AUROC of ``model`` after ``stage`` (``eval/<stage>/``; a skipped stage reuses its scores)."""
    model.eval()
    return score_task(lambda x: task.probabilities(model(x)), held_out, task, ctx.run_dir.eval / stage, stage=stage,
                      split=params.eval_split, reuse=reuse, tta=params.eval_tta, crop_fraction=params.crop_fraction,
                      batch_size=params.predict_batch_size, n_boot=params.n_boot, device=ctx.device,
                      write=ctx.fabric.is_global_zero)


def _report(ctx: RunContext, cfg: RunConfig, params: Params, stage: Stage, task: ClassificationTask,
            held_out: CXRDataset, results: dict[str, dict[str, Any]], final: nn.Module) -> dict[str, float]:
    """Table I, the final student's and the own teacher's evaluation folders, the student − teacher Δ
    (``teacher_comparison.json``), the exported final student; returns the flat final metrics."""
    table = table_one(results, split=params.eval_split, tta=params.eval_tta, task=params.task, kappa=params.kappa,
                      n_boot=params.n_boot)
    last = table["rows"][-1]
    comparison = {"teacher/macro_AUROC": _nan(table["rows"][0]["macro_AUROC"]),
                  "delta_teacher/macro_AUROC": _nan(last["minus_teacher"]),
                  "delta_teacher/macro_AUROC_ci_low": _nan(last["minus_teacher_CI95"][0]),
                  "delta_teacher/macro_AUROC_ci_high": _nan(last["minus_teacher_CI95"][1]),
                  "delta_teacher/macro_AUROC_p_boot": _nan(last["p_boot"])}
    metrics = {**headline({"classification": results[last["row"]]["summary"]}), **table_metrics(table), **comparison}
    if ctx.fabric.is_global_zero:
        write_json_atomic(ctx.run_dir.eval / "table.json", table, indent=2)
        write_text_atomic(ctx.run_dir.eval / "table.md", format_table_markdown(table) + "\n")
        for name, out_dir in (("teacher", ctx.run_dir.path / "eval_teacher"), (last["row"], ctx.run_dir.eval)):
            write_image_scores(results[name], held_out, task, out_dir, split=params.eval_split, tta=params.eval_tta)
        write_teacher_comparison(ctx, comparison, stage)
        print_table(ctx.console, table)
        print_metrics(ctx, metrics, "teacher–student classification")
        # the final student; its outputs are the task's (e.g. the classes plus "(no finding)")
        export_model(ctx.run_dir.path / "model.pt", final, cfg.model, task.output_names, cfg.data.image_size,
                     task=params.task)
    ctx.fabric.barrier()
    return metrics


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


__all__ = ["Params", "TEACHER_STAGE", "predict_unlabeled", "run", "run_on_data"]
