"""Teacher–student semi-supervised classification (Martins & Silva, "On Teacher-Student
Semi-Supervised Learning for Chest X-ray Image Classification"), with generations.

The labeled set D is the training split's images with image-level labels (supervision "box" or
"image"); the unlabeled set U is the training split's images with supervision "none" (choose the
fraction with `data.boxed_fraction` / `make_semi_split`). Sec. III-A, one generation:

1. Train the teacher on D with cross-entropy                                 stage ``teacher``
2. Classify U with the teacher (ten-crop TTA optional), pseudo-label store   ``pseudo/generation_<g-1>``
3. Keep the top κ·N_u predictions, per class in D's proportions (`pseudo.top_kappa`, κ = 0.75)
4. Train the student on the kept pseudo-labels of U only ("intermediate")   stage ``student<g>_pseudo``
5. Fine-tune the student on D                                                stage ``student<g>_finetune``

With `generations > 1` the student becomes the next teacher (the teacher–student chain of Shaw
et al., the paper's future work); each generation's pseudo-labels are stored once and read back
on a rerun. Every student starts from the teacher's initial weights ("all models starting from
the same pre-trained model", Fig. 3), unless `student_init="teacher"`.

Tasks — how an image's multi-hot `image_labels (C,)` becomes a target:

- ``multi_label``: C independent sigmoid outputs, binary cross-entropy; the top-κ filter runs per
  class (binary {absent, present} in D's prevalence) and a pseudo-label supervises only its kept
  entries (the paper's "multi-label framework" future work, needed for 14-class CXR data).
- ``single_label``: one softmax class per image, as in the paper. The class is the first present
  class (argmax of the multi-hot: ties go to the lower class index); with `normal_class` an image
  with no finding gets an extra last class "(no finding)" (without it, such an image is an error).
- ``any_finding``: two softmax classes, "(no finding)" and "abnormal" (any class present) — the
  paper's effusion-vs-no-pathology setting applied to "any finding".

Evaluation: AUROC per output column (one-vs-rest for the softmax tasks) and its macro mean, with
a seeded image bootstrap CI, on `eval_split` after every stage; each generation's intermediate and
final student are compared with the generation-0 teacher by a paired bootstrap. The run writes
``eval/<stage>/metrics.json`` and ``scores.npz``, ``eval/pseudo_gen<g>.json`` (what the filter
kept) and ``eval/table.{json,md}`` (the layout of the paper's Table I).

Stage lengths are epochs of that stage's training set (paper: 25 / 10 / 15); `train.max_steps`
is not used by this recipe. Optimizer and schedule come from `train` (paper: Adam, lr 1e-4,
×0.9 per epoch: `schedule: exp`, `exp_gamma: 0.9`, one decay per epoch of each stage).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cxrdistill.atomic import write_json_atomic
from cxrdistill.config import RunConfig
from cxrdistill.data.dataset import CXRDataset
from cxrdistill.data.study import StudyData
from cxrdistill.data.views import (
    ViewConfig,
    intensity_jitter,
    random_affine,
    warp_images,
)
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.loop import Trainer
from cxrdistill.engine.optim import build_optimizer, with_epoch_length
from cxrdistill.engine.sampler import RatioBatchSampler
from cxrdistill.errors import ConfigError, CxrDistillError
from cxrdistill.eval.classification import bootstrap_auroc, classification_summary
from cxrdistill.eval.compare import compare_auroc
from cxrdistill.eval.runs import image_score_rows
from cxrdistill.eval.tta import DEFAULT_CROP_FRACTION, ten_crop_predict
from cxrdistill.methods.kit import step_generator
from cxrdistill.methods.registry import register_method
from cxrdistill.models.classifier import ImageClassifier, masked_bce_with_logits
from cxrdistill.models.factory import build_model, export_model
from cxrdistill.pseudo.generate import stored_pseudo_labels
from cxrdistill.pseudo.store import PseudoLabelStore
from cxrdistill.pseudo.top_kappa import TopKappaSelection, class_balanced_top_kappa

Task = Literal["multi_label", "single_label", "any_finding"]
NORMAL = "(no finding)"
ABNORMAL = "abnormal"


class Params(BaseModel):
    """`method.params` of ``teacher_student_cls``; defaults are the paper's values."""

    model_config = ConfigDict(extra="forbid")

    task: Task = "single_label"
    """How image labels become targets (module docstring). The paper: single label (Effusion vs none)."""
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
    pseudo_epochs: float = Field(10.0, gt=0)
    finetune_epochs: float = Field(15.0, gt=0)
    augment: Literal["martins_silva", "flip", "none"] = "martins_silva"
    """Training augmentation: the paper's list (flip, ±25°, 15 % shift, ×0.9–1.1, perspective 0.2)."""
    intensity: float = Field(0.0, ge=0.0, le=1.0)
    """Extra intensity jitter (`data.views.intensity_jitter`); the paper lists none."""
    pseudo_tta: bool = False
    """Ten-crop TTA when pseudo-labelling U (the paper states TTA for validation and test only)."""
    eval_tta: bool = True
    """Ten-crop TTA when evaluating (Sec. IV-C)."""
    crop_fraction: float = Field(DEFAULT_CROP_FRACTION, gt=0.0, le=1.0)
    """Side of a TTA crop relative to the image (paper: 224 / 256)."""
    student_init: Literal["initial", "teacher"] = "initial"
    labeled_supervision: list[Literal["box", "image"]] = Field(default_factory=lambda: ["box", "image"])
    train_split: str = "train"
    eval_split: str = "test"
    n_boot: int = Field(1000, ge=10)
    predict_batch_size: int = Field(32, gt=0)


# ============================================================================ the recipe


@register_method("teacher_student_cls", Params)
def run(cfg: RunConfig, params: Params, ctx: RunContext) -> dict[str, float]:
    """The whole recipe on the data `cfg.data` describes; returns the Table I numbers."""
    return run_on_data(cfg, params, ctx, StudyData.from_config(cfg.data))


def run_on_data(cfg: RunConfig, params: Params, ctx: RunContext, data: StudyData) -> dict[str, float]:
    """Sec. III-A on already opened `data` (the study script passes its own)."""
    task = ClassificationTask(data.class_names, params.task, params.normal_class)
    labeled, unlabeled, held_out = _split_sets(data, params)
    labeled_set = TargetDataset.labeled(labeled, task)
    view = _view_config(params)

    # 1. teacher on D
    teacher = build_classifier(cfg, task.num_outputs)
    initial_state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    fit = _train_stage(ctx, "teacher", teacher, labeled_set, params.teacher_epochs, task, view)
    fresh_teacher = not fit.skipped
    results = {"teacher": _evaluate(ctx, "teacher", teacher, held_out, task, params, fit.skipped)}

    for gen in range(1, params.generations + 1):
        # 2. predict U (stored once per generation)
        store = PseudoLabelStore(ctx.run_dir.path / "pseudo", gen - 1)
        ids, probs = predict_unlabeled(ctx, teacher, unlabeled, store, task, params, recompute=fresh_teacher)
        # 3. class-balanced top-κ filter
        selection = class_balanced_top_kappa(
            probs, params.kappa, labeled_set.class_proportions(), mode=task.kappa_mode,
            soft=params.soft_labels, redistribute=params.redistribute)
        pseudo_set = TargetDataset.pseudo(unlabeled, ids, selection, task)
        _write_json(ctx, ctx.run_dir.eval / f"pseudo_gen{gen}.json",
                    _selection_report(unlabeled, ids, selection, task, params))
        # 4. student on the kept pseudo-labels only
        student = build_classifier(cfg, task.num_outputs)
        student.load_state_dict(initial_state if params.student_init == "initial" else teacher.state_dict())
        stage = f"student{gen}_pseudo"
        fit = _train_stage(ctx, stage, student, pseudo_set, params.pseudo_epochs, task, view,
                           counts={"pseudo_kept": dict(zip(task.output_names, selection.counts.tolist()))})
        results[f"intermediate{gen}"] = _evaluate(ctx, stage, student, held_out, task, params, fit.skipped)
        # 5. fine-tune the student on D
        stage = f"student{gen}_finetune"
        fit = _train_stage(ctx, stage, student, labeled_set, params.finetune_epochs, task, view)
        results[f"student{gen}"] = _evaluate(ctx, stage, student, held_out, task, params, fit.skipped)
        teacher, fresh_teacher = student, not fit.skipped

    table = table_one(results, params)
    _write_json(ctx, ctx.run_dir.eval / "table.json", table)
    if ctx.fabric.is_global_zero:
        (ctx.run_dir.eval / "table.md").write_text(format_table_markdown(table) + "\n", encoding="utf-8")
        print_table(ctx, table)
        # the final student; its outputs are the task's (e.g. the classes plus "(no finding)")
        export_model(ctx.run_dir.path / "model.pt", teacher, cfg.model, task.output_names, cfg.data.image_size,
                     task=params.task)
        _write_final_scores(ctx, data, task, results[f"student{params.generations}"])
    return _final_metrics(table)


def _write_final_scores(ctx: RunContext, data: StudyData, task: ClassificationTask, final: dict[str, Any]) -> None:
    """The final student's ``eval/metrics.json`` and ``eval/image_scores.json`` (its outputs that are
    manifest classes), where `cxrdistill report` and the study table's paired comparison read them."""
    shutil.copyfile(ctx.run_dir.eval / final["stage"] / "metrics.json", ctx.run_dir.eval / "metrics.json")
    saved = np.load(ctx.run_dir.eval / final["stage"] / "scores.npz", allow_pickle=False)
    category_of = dict(zip(data.class_names, data.manifest.category_ids))
    columns = [i for i, name in enumerate(task.output_names) if name in category_of]
    if columns:
        rows = image_score_rows(saved["image_ids"].tolist(), saved["scores"][:, columns],
                                [category_of[task.output_names[i]] for i in columns])
        write_json_atomic(ctx.run_dir.eval / "image_scores.json", rows)


# ============================================================================ tasks and targets


class ClassificationTask:
    """Turns multi-hot image labels `(C,)` into training targets `(K,)` and back into probabilities."""

    def __init__(self, class_names: list[str], task: Task, normal_class: bool = True) -> None:
        if task not in ("multi_label", "single_label", "any_finding"):
            raise ConfigError(f"method.params.task: unknown task {task!r}")
        self.task, self.normal_class = task, normal_class
        if task == "multi_label":
            self.output_names = list(class_names)
        elif task == "single_label":
            self.output_names = list(class_names) + ([NORMAL] if normal_class else [])
        else:
            self.output_names = [NORMAL, ABNORMAL]

    @property
    def num_outputs(self) -> int:
        return len(self.output_names)

    @property
    def kappa_mode(self) -> Literal["single", "multi"]:
        return "multi" if self.task == "multi_label" else "single"

    def encode(self, image_labels: np.ndarray, image_id: Any) -> np.ndarray:
        """Target `(K,)` float32 of one image from its multi-hot `image_labels (C,)`."""
        present = np.flatnonzero(image_labels > 0)
        if self.task == "multi_label":
            return image_labels.astype(np.float32)
        target = np.zeros(self.num_outputs, np.float32)
        if self.task == "any_finding":
            target[1 if present.size else 0] = 1.0
        elif present.size:
            target[present[0]] = 1.0
        elif self.normal_class:
            target[-1] = 1.0
        else:
            raise CxrDistillError(
                f"image {image_id}: has no class, but task single_label with normal_class=false needs one "
                f"(set method.params.normal_class=true, or use task multi_label)")
        return target

    def probabilities(self, logits: Tensor) -> Tensor:
        """`(B, K)` logits → probabilities: sigmoid (multi-label) or softmax."""
        return torch.sigmoid(logits) if self.task == "multi_label" else logits.softmax(dim=1)

    def loss(self, logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        """BCE over kept entries (multi-label) or cross-entropy over kept rows; soft targets allowed."""
        if self.task == "multi_label":
            return masked_bce_with_logits(logits, targets, mask)
        rows = mask[:, 0].to(logits.dtype)
        per_image = F.cross_entropy(logits, targets.to(logits.dtype), reduction="none")
        return (per_image * rows).sum() / rows.sum().clamp_min(1.0)


class TargetDataset(Dataset):
    """Images of a `CXRDataset` with a target `(K,)` and a mask `(K,)` (1 = supervised entry).

    Sample: {"image": (1, S, S), "image_id": int, "target": (K,), "mask": (K,)}.
    """

    def __init__(self, base: CXRDataset, rows: list[int], targets: Tensor, masks: Tensor) -> None:
        if not (len(rows) == len(targets) == len(masks)):
            raise ValueError("rows, targets and masks must have the same length")
        self.base, self.rows, self.targets, self.masks = base, rows, targets.float(), masks.float()

    @classmethod
    def labeled(cls, base: CXRDataset, task: ClassificationTask) -> TargetDataset:
        """The labeled set D: targets from each image's own labels, every entry supervised."""
        targets = torch.from_numpy(np.stack(
            [task.encode(base.manifest.image_labels(rec.id), rec.id) for rec in base.images]
        )) if len(base) else torch.zeros(0, task.num_outputs)
        return cls(base, list(range(len(base))), targets, torch.ones_like(targets))

    @classmethod
    def pseudo(cls, base: CXRDataset, ids: list[int], selection: TopKappaSelection,
               task: ClassificationTask) -> TargetDataset:
        """The kept pseudo-labels of U: only images with at least one kept entry."""
        keep = selection.keep if selection.keep.dim() == 2 else selection.keep[:, None].expand(-1, task.num_outputs)
        row_of = {rec.id: row for row, rec in enumerate(base.images)}
        kept = torch.nonzero(keep.any(dim=1)).flatten().tolist()
        return cls(base, [row_of[ids[i]] for i in kept], selection.labels[kept].cpu(), keep[kept].cpu())

    def image_ids(self) -> list[int]:
        return [self.base.images[row].id for row in self.rows]

    def class_proportions(self) -> Tensor:
        """Labeled-set statistics for the top-κ filter: class frequencies, or prevalences (multi)."""
        if len(self.targets) == 0:
            raise CxrDistillError("the labeled set is empty: no class proportions to balance against")
        return self.targets.mean(dim=0).double()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.base[self.rows[index]]
        return {"image": sample["image"], "image_id": sample["image_id"],
                "target": self.targets[index], "mask": self.masks[index]}


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


# ============================================================================ model, views, stages


def build_classifier(cfg: RunConfig, num_outputs: int) -> ImageClassifier:
    """`ImageClassifier` from `cfg.model` (`options` go to its constructor, e.g. arch, tiny)."""
    return build_model(cfg.model, num_outputs, expect="classifier")  # type: ignore[return-value]


def _view_config(params: Params) -> ViewConfig:
    """The training view: the paper's strong list, flips only, or none; plus `params.intensity`."""
    base = {"martins_silva": ViewConfig.martins_silva(), "flip": ViewConfig.weak(), "none": ViewConfig()}
    return replace(base[params.augment], intensity=params.intensity)


def augment(images: Tensor, view: ViewConfig, generator: torch.Generator | None = None) -> Tensor:
    """A random view `(B, 1, H, W)` of `images` (geometry of `view`, then intensity jitter)."""
    matrices = random_affine(images.shape[0], image_size=tuple(images.shape[-2:]), flip_p=view.flip_p,
                             rotate_deg=view.rotate_deg, translate=view.translate, scale=view.scale,
                             perspective=view.perspective, generator=generator).to(images.device)
    return intensity_jitter(warp_images(images, matrices), view.intensity, generator)


def batch_loss(model: ImageClassifier, batch: dict[str, Any], task: ClassificationTask,
               view: ViewConfig, generator: torch.Generator | None = None) -> Tensor:
    """Loss of one training batch on an augmented view of its images (drawn from `generator`)."""
    return task.loss(model(augment(batch["image"], view, generator)), batch["target"], batch["mask"])


def _train_stage(ctx: RunContext, stage: str, model: ImageClassifier, dataset: TargetDataset,
                 epochs: float, task: ClassificationTask, view: ViewConfig,
                 counts: dict[str, dict[str, int]] | None = None):
    """Train `model` on `dataset` for `epochs` epochs through `ctx.trainer(stage)`; returns its FitResult."""
    if not len(dataset):
        raise CxrDistillError(f"stage {stage!r}: no training image (an empty pseudo-label set? raise kappa)")
    cfg = ctx.cfg.train
    steps = max(1, math.ceil(epochs * len(dataset) / cfg.batch_size))
    seed = cfg.seed + sum(map(ord, stage))  # each stage its own batch order
    sampler = RatioBatchSampler(range(len(dataset)), [], cfg.batch_size, 0, seed,
                                rank=ctx.rank, world_size=ctx.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=ctx.cfg.data.num_workers)
    cfg = with_epoch_length(cfg, len(dataset))  # schedule: exp decays once per epoch of this stage
    trainer = Trainer(cfg, ctx.run_dir, stage, fabric=ctx.fabric, console=ctx.console)
    model.train()

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        for name, per_class in (counts or {}).items():
            trainer.log_counts(name, per_class)
        # the view depends on (seed, stage, step) only: a resumed or restarted stage draws the same
        # views whatever the earlier stages (skipped on a rerun) did with the global RNG
        return {"ce": batch_loss(model, batch, task, view, step_generator(seed, step))}

    return trainer.fit(step_fn, {"model": model}, build_optimizer(model.parameters(), cfg), loader, steps,
                       sampler=sampler)


# ============================================================================ prediction


@torch.no_grad()
def predict_probs(model: ImageClassifier, dataset: CXRDataset, task: ClassificationTask, *, tta: bool,
                  crop_fraction: float, batch_size: int, device: torch.device) -> tuple[list[int], Tensor]:
    """Image ids and probabilities `(N, K)` (CPU) of `model` on `dataset`, optionally ten-crop TTA."""
    was_training = model.training
    model.eval()
    ids, out = [], []
    predict = lambda images: task.probabilities(model(images))
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([s["image"] for s in samples]).to(device)
        probs = ten_crop_predict(predict, images, crop_fraction) if tta else predict(images)
        out.append(probs.float().cpu())
        ids += [int(s["image_id"]) for s in samples]
    model.train(was_training)
    return ids, torch.cat(out) if out else torch.zeros(0, task.num_outputs)


def predict_unlabeled(ctx: RunContext, teacher: ImageClassifier, unlabeled: CXRDataset,
                      store: PseudoLabelStore, task: ClassificationTask, params: Params,
                      recompute: bool) -> tuple[list[int], Tensor]:
    """Teacher probabilities `(N_u, K)` on U, from the store when this generation is complete.

    `recompute`: the teacher was (re)trained in this run, so stored labels of an earlier teacher
    are stale and removed. A killed pass resumes, skipping the images already stored.
    """
    def predict(batch: dict[str, Any]) -> Tensor:
        images = batch["image"].to(ctx.device)
        probs = (ten_crop_predict(lambda x: task.probabilities(teacher(x)), images, params.crop_fraction)
                 if params.pseudo_tta else task.probabilities(teacher(images)))
        return probs.float()

    ids = [rec.id for rec in unlabeled.images]
    was_training = teacher.training
    teacher.eval()
    records = stored_pseudo_labels(predict, unlabeled, store, fresh=recompute, fabric=ctx.fabric,
                                   metadata={"task": task.task, "outputs": task.output_names,
                                             "tta": params.pseudo_tta},
                                   batch_size=params.predict_batch_size,
                                   chunk_size=4 * params.predict_batch_size)
    teacher.train(was_training)
    return ids, torch.stack([records[i] for i in ids]).float()


# ============================================================================ evaluation and Table I


def _evaluate(ctx: RunContext, stage: str, model: ImageClassifier, held_out: CXRDataset,
              task: ClassificationTask, params: Params, reuse: bool) -> dict[str, Any]:
    """AUROC (+ bootstrap CI) of `model` on the held-out split; writes eval/<stage>/{metrics.json, scores.npz}.

    A skipped (already finished) stage reuses its saved scores.
    """
    out_dir = ctx.run_dir.eval / stage
    scores_path = out_dir / "scores.npz"
    if reuse and scores_path.is_file():
        saved = np.load(scores_path, allow_pickle=False)
        ids, scores, truth = saved["image_ids"].tolist(), saved["scores"], saved["truth"]
    else:
        ids, probs = predict_probs(model, held_out, task, tta=params.eval_tta, crop_fraction=params.crop_fraction,
                                   batch_size=params.predict_batch_size, device=ctx.device)
        scores = probs.numpy()
        truth = np.stack([task.encode(held_out.manifest.image_labels(i), i) for i in ids])
    summary = classification_summary(bootstrap_auroc(truth, scores, n_boot=params.n_boot, seed=0),
                                      task.output_names)
    if ctx.fabric.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(scores_path, image_ids=np.asarray(ids, np.int64), scores=scores, truth=truth)
        _write_json(ctx, out_dir / "metrics.json", {"stage": stage, "split": params.eval_split,
                                                    "tta": params.eval_tta, **summary})
    return {"stage": stage, "summary": summary, "scores": scores, "truth": truth}


def table_one(results: dict[str, dict[str, Any]], params: Params) -> dict[str, Any]:
    """Rows of the paper's Table I (teacher / intermediate / student per generation) with CIs, and
    each student's paired-bootstrap difference from the generation-0 teacher."""
    teacher = results["teacher"]
    rows = []
    for name, res in results.items():
        summary = res["summary"]
        row = {"row": name, "stage": res["stage"], "macro_AUROC": summary["macro_AUROC"],
               "CI95": summary["macro_AUROC_CI95"], "n_images": summary["n_images"],
               "per_class": {k: v["AUROC"] for k, v in summary["per_class"].items()}}
        if name != "teacher":
            cmp = compare_auroc(teacher["truth"], teacher["scores"], res["scores"], n_boot=params.n_boot, seed=0)
            row["minus_teacher"] = _none_nan(cmp.diff)
            row["minus_teacher_CI95"] = [_none_nan(cmp.ci_low), _none_nan(cmp.ci_high)]
            row["p_boot"] = _none_nan(cmp.p_boot)
        rows.append(row)
    return {"split": params.eval_split, "tta": params.eval_tta, "task": params.task, "kappa": params.kappa,
            "n_boot": params.n_boot, "rows": rows}


def _none_nan(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _fmt(value: float | None, ci: list[float | None] | None = None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def format_table_markdown(table: dict[str, Any]) -> str:
    """Table I as Markdown: one row per stage, macro AUROC [95% CI] and the paired Δ vs the teacher."""
    lines = ["| model | stage | macro AUROC [95% CI] | Δ vs teacher [95% CI] |", "|---|---|---|---|"]
    for row in table["rows"]:
        delta = _fmt(row.get("minus_teacher"), row.get("minus_teacher_CI95"), signed=True) \
            if "minus_teacher" in row else "—"
        lines.append(f"| {row['row']} | {row['stage']} | {_fmt(row['macro_AUROC'], row['CI95'])} | {delta} |")
    return "\n".join(lines)


def print_table(ctx: RunContext, table: dict[str, Any]) -> None:
    from rich.table import Table

    out = Table(title=f"Table I — macro AUROC on {table['split']!r} (TTA {'on' if table['tta'] else 'off'})")
    for column in ("model", "stage", "macro AUROC [95% CI]", "Δ vs teacher [95% CI]"):
        out.add_column(column)
    for row in table["rows"]:
        delta = _fmt(row.get("minus_teacher"), row.get("minus_teacher_CI95"), signed=True) \
            if "minus_teacher" in row else "—"
        out.add_row(row["row"], row["stage"], _fmt(row["macro_AUROC"], row["CI95"]), delta)
    ctx.console.print(out)


def _final_metrics(table: dict[str, Any]) -> dict[str, float]:
    """Flat metrics for final_metrics.json: `<row>_auroc` (+ CI) and `<row>_minus_teacher` (+ CI), and
    the final student's as ``macro_AUROC`` (+ ``_ci_low`` / ``_ci_high``), the key the other recipes use."""
    out: dict[str, float] = {}
    final = table["rows"][-1]
    out["macro_AUROC"] = _nan(final["macro_AUROC"])
    out["macro_AUROC_ci_low"], out["macro_AUROC_ci_high"] = map(_nan, final["CI95"])
    for row in table["rows"]:
        name = row["row"]
        out[f"{name}_auroc"] = _nan(row["macro_AUROC"])
        out[f"{name}_auroc_ci_low"], out[f"{name}_auroc_ci_high"] = map(_nan, row["CI95"])
        if "minus_teacher" in row:
            out[f"{name}_minus_teacher"] = _nan(row["minus_teacher"])
            out[f"{name}_minus_teacher_ci_low"], out[f"{name}_minus_teacher_ci_high"] = \
                map(_nan, row["minus_teacher_CI95"])
    return out


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _selection_report(unlabeled: CXRDataset, ids: list[int], selection: TopKappaSelection,
                      task: ClassificationTask, params: Params) -> dict[str, Any]:
    """What the filter kept, per class; and, when the manifest still holds the hidden labels of U
    (a simulated split), how often the kept hard labels agree with them."""
    keep = selection.keep if selection.keep.dim() == 2 else selection.keep[:, None].expand(-1, task.num_outputs)
    hidden = torch.from_numpy(np.stack([task.encode(unlabeled.manifest.image_labels(i), i) for i in ids])) \
        if task.task != "single_label" or task.normal_class else None
    report: dict[str, Any] = {
        "kappa": params.kappa, "soft": params.soft_labels, "n_unlabeled": len(ids),
        "n_images_kept": int(keep.any(dim=1).sum()),
        "kept_per_output": dict(zip(task.output_names, selection.counts.tolist())),
    }
    if hidden is not None and bool(hidden.any()):
        hard = (selection.labels > 0.5).float() if task.task == "multi_label" else \
            F.one_hot(selection.labels.argmax(dim=1), task.num_outputs).float()
        agree = (hard == hidden)[keep]
        report["agreement_with_hidden_labels"] = float(agree.float().mean()) if agree.numel() else None
        report["note"] = "agreement is meaningful only when the manifest kept the labels of U (simulated split)"
    return report


def _write_json(ctx: RunContext, path: Path, payload: Any) -> None:
    if ctx.fabric.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)


__all__ = ["ClassificationTask", "Params", "TargetDataset", "augment", "batch_loss", "build_classifier",
           "format_table_markdown", "predict_probs", "predict_unlabeled", "run", "run_on_data", "table_one"]
