"""The shared recipe kit: the one supervised stage, its reuse store, model building, views, headline.

Every recipe that starts from a supervised model (the supervised baselines, TSD / CEIRD / STAC's
teacher, Mean / Soft Teacher's burn-in, OXnet's base detector) gets it from
:func:`supervised_stage`: the *same* seeded initialisation, loader, augmentation
(`data.views.random_view`) and schedule. So the `supervised_detector` row of a
study and TSD's teacher at the same seed are one checkpoint.

**The stage store.** A finished stage is kept under ``<store>/<key>/`` (``model.pt``, ``key.json``),
where ``key`` is a hash of everything that determines the trained weights (:func:`stage_key`: the
manifest's content, split, fractions and split seed, image size, model config, schedule, steps,
augmentation, world size and :data:`STAGE_VERSION`). A second recipe — in the same run folder or
another one — at the same key loads it (``weights_only=True``) instead of training; a changed key
trains anew. The store is ``$CXRDISTILL_STAGE_STORE`` (``off`` disables it), else
``$CXRDISTILL_CACHE/stages`` (``~/.cache/cxrdistill/stages``). The stage's evaluation on a test
split is stored next to it (:func:`evaluate_stage`), so a recipe's "own teacher" row is read back,
byte for byte the baseline's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cxrdistill.atomic import file_sha256, write_json_atomic
from cxrdistill.config import ModelConfig
from cxrdistill.data.dataset import CXRDataset, collate
from cxrdistill.data.manifest import manifest_records_sha256
from cxrdistill.data.study import StudyData, default_cache_root
from cxrdistill.data.views import View, ViewConfig, random_view
from cxrdistill.engine.checkpoint import load_module_weights, save_checkpoint
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.loop import FitResult
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.engine.sampler import RatioBatchSampler
from cxrdistill.errors import ConfigError
from cxrdistill.methods.init_from import init_checkpoint
from cxrdistill.models.classifier import ImageClassifier, masked_bce_with_logits
from cxrdistill.models.detector import RetinaNet
from cxrdistill.models.factory import build_model, export_model
from cxrdistill.models.heatmap import HeatmapFPN
from cxrdistill.models.heatmap_targets import map_supervised_indices, map_targets, supervised_map_loss

Augment = Literal["aals", "flip", "flip_shift", "none", "strong"]
STAGE_VERSION = 1
"""Bumped when the supervised stage's code changes what it trains (old store entries then miss)."""
STAGE_STORE_ENV = "CXRDISTILL_STAGE_STORE"
SUPERVISED_STAGE = "supervised"
"""The run-folder stage name of the shared supervised stage (``checkpoints/supervised``)."""


# =============================================================================== models and views


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def record_tensor(record: Tensor | dict[str, Tensor]) -> Tensor:
    """A stored pseudo-label record that is one tensor (a classifier's ``(K,)`` row, not a dict of them)."""
    if not isinstance(record, Tensor):
        raise TypeError(f"expected a tensor record, got one with keys {sorted(record)}")
    return record


def module_as(model: nn.Module, kind: type[ModuleT]) -> ModuleT:
    """``model`` (a stage's model or an EMA teacher's copy, typed ``nn.Module``) as the ``kind`` it is."""
    if not isinstance(model, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(model).__name__}")
    return model


def seeded(seed: int | None, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` with the global RNG seeded by ``seed`` (restored afterwards); None: as it is."""
    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def build_detector(model_cfg: ModelConfig, num_classes: int, seed: int | None = None) -> RetinaNet:
    """The RetinaNet of ``cfg.model``; with ``seed`` its initial weights depend only on the seed."""
    return seeded(seed, lambda: build_model(model_cfg, num_classes, expect="detector"))  # type: ignore[return-value]


def build_heatmap_model(model_cfg: ModelConfig, num_classes: int, seed: int | None = None) -> HeatmapFPN:
    return seeded(seed, lambda: build_model(model_cfg, num_classes, expect="heatmap"))  # type: ignore[return-value]


def build_classifier_model(model_cfg: ModelConfig, num_classes: int, seed: int | None = None) -> ImageClassifier:
    return seeded(seed, lambda: build_model(model_cfg, num_classes, expect="classifier"))  # type: ignore[return-value]


def view_config(augment: Augment) -> ViewConfig:
    """The training view: flip (the weak view), flip + 10 % shift, the strong list, AALS's list
    (flip, rotation ±10°, contrast ±0.2, brightness ±0.1), or identity geometry."""
    return {"flip": ViewConfig.weak(), "flip_shift": ViewConfig(flip_p=0.5, translate=0.1),
            "strong": ViewConfig.martins_silva(), "none": ViewConfig(),
            "aals": ViewConfig(flip_p=0.5, rotate_deg=10.0, contrast=0.2, brightness=0.1)}[augment]


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): augmentation is the same after a resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))


# =============================================================================== data


def labeled_loader(dataset: CXRDataset, first: list[int], second: list[int], n_first: int, n_second: int,
                   seed: int, ctx: RunContext) -> tuple[DataLoader[dict[str, Any]], RatioBatchSampler]:
    """An endless, resumable loader of batches with ``n_first`` items of ``first`` then ``n_second`` of ``second``."""
    sampler = RatioBatchSampler(first, second, n_first, n_second, seed, rank=ctx.rank, world_size=ctx.world_size)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                      num_workers=ctx.cfg.data.num_workers), sampler


def boxed_indices(dataset: CXRDataset) -> list[int]:
    """Indices of the images with supervision "box"; a clear error when there are none."""
    idx = [i for i, im in enumerate(dataset.images) if im.supervision == "box"]
    if not idx:
        raise ConfigError("the training split has no image with boxes (supervision 'box'); "
                          "raise data.boxed_fraction or check the manifest")
    return idx


def image_labeled(dataset: CXRDataset) -> list[int]:
    """Indices of the images with image-level labels (supervision "box" or "image")."""
    idx = [i for i, im in enumerate(dataset.images) if im.supervision in ("box", "image")]
    if not idx:
        raise ConfigError("the training split has no image with image-level labels (supervision 'box' or 'image')")
    return idx


@dataclass
class TrainSets:
    """The training images: one dataset and the indices of its labeled / unlabeled images."""

    dataset: CXRDataset
    labeled: list[int]
    unlabeled: list[int]

    @property
    def unlabeled_ids(self) -> list[int]:
        return [self.dataset.images[i].id for i in self.unlabeled]


def split_train(data: StudyData, split: str = "train", unlabeled: Sequence[str] = ("image", "none"),
                need_unlabeled: str | None = None) -> TrainSets:
    """Labeled (supervision "box") and unlabeled (``unlabeled`` supervisions; "image" images count
    as unlabeled, their image-level labels are not used) training images. ``need_unlabeled``: the
    recipe's name, and an error naming it when there is no unlabeled image."""
    dataset = data.dataset(split, supervision=("box", *unlabeled))
    labeled = [i for i, im in enumerate(dataset.images) if im.supervision == "box"]
    rest = [i for i, im in enumerate(dataset.images) if im.supervision != "box"]
    if not labeled:
        raise ConfigError(f"split {split!r} has no image with boxes: the teacher needs labeled images "
                          "(set data.boxed_fraction, or use a manifest with supervision 'box')")
    if need_unlabeled is not None and not rest:
        raise ConfigError(f"{need_unlabeled}: no unlabeled training image; lower data.boxed_fraction")
    return TrainSets(dataset, labeled, rest)


def semi_loader(ctx: RunContext, sets: TrainSets, seed: int) -> tuple[DataLoader[dict[str, Any]], RatioBatchSampler]:
    """Endless batches of ``train.batch_size`` labeled then ``train.unlabeled_batch_size`` (0: as many)
    unlabeled images of ``sets``."""
    t = ctx.cfg.train
    return labeled_loader(sets.dataset, sets.labeled, sets.unlabeled, t.batch_size, t.unlabeled_batch_size or t.batch_size,
                          seed, ctx)


# =============================================================================== the semi-supervised batch


@dataclass
class Part:
    """The labeled or the unlabeled images of a collated batch, and the views a recipe made of them.

    ``rows (B,)`` bool: this part's rows of the batch; ``images (n, 1, H, W)`` un-augmented; ``boxes``
    / ``labels``: per image ``(K, 4)`` / ``(K,)`` (empty for unlabeled images); ``image_ids``.
    ``weak`` / ``strong``: the part's views (`data.views.View`: images, geometry, projected boxes),
    set by the recipe with :meth:`view`.
    """

    rows: Tensor
    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    image_ids: list[int]
    weak: View | None = None
    strong: View | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def index(self) -> list[int]:
        """This part's row numbers in the batch."""
        return self.rows.nonzero().flatten().tolist()

    def view(self, cfg: ViewConfig | None, generator: torch.Generator, boxes: list[Tensor] | None = None,
             labels: list[Tensor] | None = None) -> View:
        """`random_view` of this part's images, carrying ``boxes`` / ``labels`` (default: its own)."""
        return random_view(self.images, cfg, generator, self.boxes if boxes is None else boxes,
                           self.labels if labels is None else labels)


@dataclass
class SemiBatch:
    """A batch as its ``labeled`` and ``unlabeled`` parts (selected by mask, never by position)."""

    labeled: Part
    unlabeled: Part

    @classmethod
    def split(cls, batch: dict[str, Any], labeled: Tensor | None = None) -> SemiBatch:
        """The parts of a collated batch; ``labeled (B,)`` bool (default: ``batch["has_boxes"]``)."""
        mask = (batch["has_boxes"] if labeled is None else labeled).bool()

        def part(rows: Tensor) -> Part:
            index = rows.nonzero().flatten().tolist()
            return Part(rows, batch["image"][rows.to(batch["image"].device)], [batch["boxes"][i] for i in index],
                        [batch["labels"][i] for i in index], batch["image_id"][rows.to(batch["image_id"].device)].tolist())

        return cls(part(mask), part(~mask))


def semi_losses(sup: dict[str, Tensor], unsup: dict[str, Tensor] | None = None,
                unsup_weight: float = 1.0) -> dict[str, Tensor]:
    """The loss dict of a semi-supervised step: ``sup/<term>`` and ``unsup/<term>`` (times ``unsup_weight``,
    the recipe's λ_u), in that order; L = L_s + λ_u · L_u is their sum (the trainer's)."""
    out = {f"sup/{k}": v for k, v in sup.items()}
    for k, v in (unsup or {}).items():
        out[f"unsup/{k}"] = unsup_weight * v
    return out


# =============================================================================== the supervised loop

Losses = Callable[[dict[str, Any], View], dict[str, Tensor]]
"""``losses(batch, view)``: the loss terms of a collated batch seen through its random view."""


def fit_on(ctx: RunContext, stage: str, model: nn.Module, dataset: CXRDataset, indices: list[int],
           augment: Augment, losses: Losses, max_steps: int | None) -> FitResult:
    """The supervised loop every baseline shares: batches of ``dataset[indices]``, the ``augment`` view
    (`data.views.random_view`: images ``(B, 1, H, W)``, projected boxes), ``losses(batch, view)``, stage
    ``stage`` of ``train.max_steps`` (or ``max_steps``) optimizer steps, resumable and exact."""
    cfg = ctx.cfg.train
    loader, sampler = labeled_loader(dataset, indices, [], cfg.batch_size, 0, cfg.seed + sum(map(ord, stage)), ctx)
    view = view_config(augment)
    model.train()

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        seen = random_view(batch["image"], view, step_generator(cfg.seed, step), batch["boxes"], batch["labels"])
        return losses(batch, seen)

    return ctx.trainer(stage).fit(step_fn, {"model": model}, build_optimizer(model.parameters(), cfg), loader,
                                  cfg.max_steps if max_steps is None else max_steps, sampler=sampler)


def detector_losses(model: RetinaNet) -> Losses:
    """Focal + box loss of ``model`` (``sup/cls``, ``sup/box`` in the logs), boxes per image logged."""

    def losses(batch: dict[str, Any], view: View) -> dict[str, Tensor]:
        targets = view.targets
        out = model.loss(model(view.images), targets)
        n_boxes = sum(len(t["boxes"]) for t in targets) / max(len(targets), 1)
        return {**semi_losses(out), "log_boxes_per_image": torch.tensor(n_boxes)}

    return losses


def classifier_losses(model: ImageClassifier) -> Losses:
    """Masked BCE on the image labels of the batch."""

    def losses(batch: dict[str, Any], view: View) -> dict[str, Tensor]:
        mask = batch["has_image_labels"].to(view.images.dtype)[:, None].expand_as(batch["image_labels"])
        return {"bce": masked_bce_with_logits(model(view.images), batch["image_labels"], mask)}

    return losses


def heatmap_losses(model: HeatmapFPN) -> Losses:
    """Pixel BCE of the probability maps on R ∪ N (AALS Eq. 1): box masks of the box images (as
    projected into the view), all-zero maps for the absent classes of image-level images."""
    no_positives = torch.zeros(0, dtype=torch.long)

    def losses(batch: dict[str, Any], view: View) -> dict[str, Tensor]:
        targets = map_targets(batch, model.num_classes, model.output_stride, no_positives, view)
        return {"sup/pixel_bce": supervised_map_loss(model(view.images), targets)}

    return losses


def train_detector(ctx: RunContext, stage: str, model: RetinaNet, dataset: CXRDataset, augment: Augment,
                   max_steps: int | None = None) -> FitResult:
    """Train ``model`` on the box images of ``dataset`` as stage ``stage`` (resumable, not stored)."""
    return fit_on(ctx, stage, model, dataset, boxed_indices(dataset), augment, detector_losses(model), max_steps)


def train_classifier(ctx: RunContext, stage: str, model: ImageClassifier, dataset: CXRDataset, augment: Augment,
                     max_steps: int | None = None) -> FitResult:
    """Train ``model`` with masked BCE on the image labels of ``dataset``'s labeled images (stage ``stage``)."""
    return fit_on(ctx, stage, model, dataset, image_labeled(dataset), augment, classifier_losses(model), max_steps)


# =============================================================================== the shared stage


@dataclass
class Stage:
    """A supervised stage: its model, its key, and how it was obtained.

    ``fresh``: its weights differ from what this run folder held before (trained now, or the key
    changed), so anything derived from an earlier teacher (stored pseudo-labels) is stale.
    """

    model: nn.Module
    key: str
    source: Literal["trained", "run_dir", "store", "init_from"]
    fresh: bool
    steps: int

    @property
    def trained(self) -> bool:
        return self.source == "trained"


def stage_store_root() -> Path | None:
    """``$CXRDISTILL_STAGE_STORE`` (``off``/``none``/empty: no store), else ``<cache root>/stages``."""
    env = os.environ.get(STAGE_STORE_ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "off", "none", "0", "false") else Path(env)
    return default_cache_root() / "stages"


def stage_key(ctx: RunContext, kind: str, steps: int, augment: Augment, split: str,
              stage: str = SUPERVISED_STAGE, head: str | None = None) -> tuple[str, dict[str, Any]]:
    """The hash of everything that determines a supervised stage's weights, and what was hashed
    (the stage name too: it seeds the loader). A detector stage leaves out ``data.weak_fraction``:
    it trains on the boxed images only, the same at any weak fraction, so a boxes + image-labels
    recipe at a fraction and seed shares the supervised row's model."""
    cfg = ctx.cfg
    data = cfg.data
    manifest = Path(data.manifest) if data.manifest is not None else None
    train = cfg.train.model_dump(mode="json", include={
        "batch_size", "lr", "weight_decay", "optimizer", "momentum", "warmup_steps", "schedule", "min_lr_ratio",
        "step_milestones", "step_gamma", "precision", "accumulate", "grad_clip", "seed", "nan_policy",
        "rollback_lr_factor", "max_rollbacks"})
    if cfg.train.schedule == "exp":  # the per-epoch decay (other schedules ignore both)
        train.update(exp_gamma=cfg.train.exp_gamma, steps_per_epoch=cfg.train.steps_per_epoch)
    data_key: dict[str, Any] = {
        "manifest_records_sha256": manifest_records_sha256(manifest) if manifest is not None and manifest.is_file()
        else None,
        "image_size": data.image_size, "boxed_fraction": data.boxed_fraction,
        "weak_fraction": data.weak_fraction, "split_seed": data.split_seed, "on_error": data.on_error}
    if kind == "detector":  # trained on the boxed images only, which do not depend on weak_fraction
        del data_key["weak_fraction"]  # (`data.splits.make_semi_split`): OXnet's base is the supervised row
    payload: dict[str, Any] = {
        "version": STAGE_VERSION, "kind": kind, "stage": stage, "steps": int(steps), "augment": augment,
        "split": split, "data": data_key,
        "model": cfg.model.model_dump(mode="json"), "train": train, "world_size": ctx.world_size,
    }
    if head is not None:  # a classifier trained for another task than the classes' multi-label BCE
        payload["head"] = head
    weights = _local_weights_sha256(cfg.model.pretrained)
    if weights is not None:  # a local file / run folder: its bytes, not its path, decide the stage
        payload["pretrained_sha256"] = weights
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], payload


def _local_weights_sha256(source: str | None) -> str | None:
    """sha256 of the weights file a local ``model.pretrained`` (file, HF folder, run folder) resolves
    to; None for no weights, ``imagenet`` (versioned by its package) or a URL."""
    from cxrdistill.models.pretrained import IMAGENET, is_url, resolve_weights_file

    if source is None or str(source) == IMAGENET or is_url(str(source)):
        return None
    return file_sha256(resolve_weights_file(source))


class ClassifierHead(Protocol):
    """A classifier stage's task when it is not multi-label BCE on the classes (`data.targets`)."""

    @property
    def name(self) -> str: ...  # part of the stage key

    @property
    def num_outputs(self) -> int: ...

    def stage_losses(self, model: nn.Module) -> Losses: ...


def supervised_stage(ctx: RunContext, data: StudyData, *,
                     kind: Literal["detector", "classifier", "heatmap"] = "detector",
                     steps: int | None = None, augment: Augment = "flip", split: str = "train",
                     stage: str = SUPERVISED_STAGE, head: ClassifierHead | None = None) -> Stage:
    """The supervised model of ``data``'s labeled training images, trained once per key.

    Detector: the box images (supervision "box"); classifier: images with image labels; heatmap:
    R ∪ N (box images, and image-level images with an absent class: :func:`heatmap_losses`). Seeded
    initialisation (``train.seed``), :func:`fit_on` with ``augment`` for ``steps`` optimizer steps
    (None: ``train.max_steps``). Looked up in the stage store first; trained (resumably, as stage
    ``stage`` of this run folder) and stored otherwise. ``head`` (classifier only): its outputs and
    loss instead of multi-label BCE on the classes, its name in the key.
    With ``init_from`` in the config: that run's stage ``stage``, loaded (`methods.init_from`).
    """
    cfg = ctx.cfg
    steps = cfg.train.max_steps if steps is None else int(steps)
    key, payload = stage_key(ctx, kind, steps, augment, split, stage, None if head is None else head.name)
    if kind == "detector":
        detector = build_detector(cfg.model, data.num_classes, cfg.train.seed)
        model: nn.Module = detector
        dataset = data.dataset(split, supervision="box")
        indices, losses = boxed_indices(dataset), detector_losses(detector)
    elif kind == "heatmap":
        model = build_heatmap_model(cfg.model, data.num_classes, cfg.train.seed)
        dataset = data.dataset(split, supervision=("box", "image"))
        indices, losses = map_supervised_indices(dataset), heatmap_losses(model)
        if not indices:
            raise ConfigError(f"split {split!r} has no image with boxes or image-level negatives (R ∪ N is empty)")
    else:
        model = build_classifier_model(cfg.model, data.num_classes if head is None else head.num_outputs,
                                       cfg.train.seed)
        dataset = data.dataset(split, supervision=("box", "image"))
        losses = classifier_losses(model) if head is None else head.stage_losses(model)
        indices = image_labeled(dataset)
    stage_dir = ctx.run_dir.stage_dir(stage)
    marker = stage_dir / "stage_key.json"
    previous = json.loads(marker.read_text(encoding="utf-8")).get("key") if marker.is_file() else None
    if cfg.init_from is not None:  # a study row's `init_from`: that run's stage (methods/init_from.py)
        path, key = init_checkpoint(cfg.init_from, stage)
        load_module_weights(path, model)
        if ctx.fabric.is_global_zero:
            write_json_atomic(marker, {"key": key, "source": "init_from", "init_from": str(path), **payload})
        ctx.fabric.barrier()
        return Stage(model.to(ctx.device).eval(), key, "init_from", fresh=previous != key, steps=steps)
    root = stage_store_root()
    entry = root / kind / key if root is not None else None
    stored = entry is not None and (entry / "model.pt").is_file() and (entry / "key.json").is_file()
    if stored:
        load_module_weights(entry / "model.pt", model)  # type: ignore[operator]
        model.to(ctx.device)
        source: Literal["trained", "run_dir", "store"] = "store"
        ctx.console.print(f"supervised stage {key}: loaded from the stage store {entry}", highlight=False)
    else:
        if previous is not None and previous != key and ctx.fabric.is_global_zero:
            for child in stage_dir.iterdir():  # another key's checkpoints: start this stage over
                if child.is_file():
                    child.unlink()
                else:
                    shutil.rmtree(child)
        ctx.fabric.barrier()
        fit = fit_on(ctx, stage, model, dataset, indices, augment, losses, steps)
        source = "run_dir" if fit.skipped else "trained"
        if entry is not None and ctx.fabric.is_global_zero:
            save_checkpoint(entry / "model.pt", {"modules": {"model": model.state_dict()}})
            write_json_atomic(entry / "key.json", {"key": key, **payload})  # last: marks the entry complete
    if ctx.fabric.is_global_zero:
        write_json_atomic(marker, {"key": key, "source": source, "store": str(entry) if entry else None, **payload})
    ctx.fabric.barrier()
    model.eval()
    return Stage(model, key, source, fresh=source == "trained" or previous != key, steps=steps)


@dataclass
class BurnIn:
    """A mean-teacher recipe's start: its ``student``, the shared ``stage`` it came from (None without
    burn-in), the burn-in ``steps`` and the stage's evaluation on the test images (its own teacher's)."""

    student: RetinaNet
    stage: Stage | None
    steps: int
    teacher_metrics: dict[str, Any] = field(default_factory=dict)


def burn_in(ctx: RunContext, data: StudyData, steps: int | None, augment: Augment, split: str,
            held_out: CXRDataset, *, eval_split: str, n_boot: int) -> BurnIn:
    """The burned-in student: the shared supervised stage of ``steps`` (None: half of ``train.max_steps``;
    the `supervised_detector` checkpoint at these steps), scored on ``held_out`` as the recipe's own
    teacher (``run_dir/eval_teacher``). ``steps`` 0: a fresh seeded detector and no teacher."""
    steps = ctx.cfg.train.max_steps // 2 if steps is None else steps
    if steps <= 0:
        return BurnIn(build_detector(ctx.cfg.model, data.num_classes, ctx.cfg.train.seed), None, 0)
    stage = supervised_stage(ctx, data, steps=steps, augment=augment, split=split)
    scored = evaluate_stage(ctx, stage, held_out, split=eval_split, n_boot=n_boot, topk_candidates=1000,
                            out_dirs=[ctx.run_dir.path / "eval_teacher"])
    return BurnIn(stage.model, stage, steps, scored)  # type: ignore[arg-type]


# =============================================================================== evaluation


def evaluate_against_burn_in(ctx: RunContext, model: RetinaNet, start: BurnIn, held_out: CXRDataset, *, split: str,
                             n_boot: int, title: str, class_names: list[str]) -> dict[str, float]:
    """The final model's metrics (``run_dir/eval``; exported as ``model.pt``) and, after a burn-in, the
    burned-in model it started from (its own teacher: ``teacher/<metric>``) and the Δ against it on the
    same test images."""
    from cxrdistill.eval.runs import evaluate_detector

    metrics = evaluate_final(ctx, lambda: evaluate_detector(model, held_out, ctx.run_dir.eval, split=split,
                                                            n_boot=n_boot), title, model, class_names)
    if start.stage is not None:
        metrics.update(headline(start.teacher_metrics, "teacher"))
        metrics.update(compare_with_own_teacher(ctx, start.stage, held_out, split, n_boot=n_boot))
    return metrics


def evaluate_stage(ctx: RunContext, stage: Stage, eval_set: CXRDataset, *, split: str, n_boot: int,
                   topk_candidates: int, out_dirs: list[Path], batch_size: int = 16) -> dict[str, Any]:
    """The stage model's detection metrics on ``eval_set``; the report files go into each of ``out_dirs``.

    Read from the stage store when this stage was already scored there with the same split,
    bootstrap replicates and decoding (so every recipe's "own teacher" row is the baseline's, byte
    for byte); otherwise predicted, scored and stored.
    """
    from cxrdistill.eval.runs import evaluate_detections, predict_detections

    eval_key = hashlib.sha256(json.dumps({"split": split, "n_boot": n_boot, "topk": topk_candidates,
                                          "ids": [im.id for im in eval_set.images]}).encode()).hexdigest()[:12]
    root = stage_store_root()
    entry = root / "detector" / stage.key / f"eval_{eval_key}" if root is not None else None
    files = ("metrics.json", "predictions.json")
    if entry is not None and all((entry / f).is_file() for f in files):
        for out_dir in out_dirs:
            out_dir.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(entry / f, out_dir / f)
        cached: dict[str, Any] = json.loads((entry / "metrics.json").read_text(encoding="utf-8"))
        return cached
    dets = predict_detections(stage.model, eval_set, batch_size=batch_size, topk_candidates=topk_candidates)
    metrics: dict[str, Any] = {}
    targets = list(out_dirs) + ([entry] if entry is not None and ctx.fabric.is_global_zero else [])
    for out_dir in targets:
        metrics = evaluate_detections(dets, eval_set, out_dir, split=split, n_boot=n_boot)
    return metrics


def teacher_comparison(eval_set: CXRDataset, split: str, teacher_dir: Path, student_dir: Path, *,
                       n_boot: int, ious: tuple[float, ...] = (0.25, 0.5, 0.75), seed: int = 0) -> dict[str, float]:
    """Student − own teacher on the same test images, paired bootstrap over images, per mAP@IoU.

    Reads ``predictions.json`` of both folders. Returns flat keys ``teacher/mAP@t``,
    ``delta_teacher/mAP@t`` and its ``_ci_low`` / ``_ci_high`` / ``_p_boot``.
    """
    from cxrdistill.eval.compare import compare_detection
    from cxrdistill.eval.detection import CocoParams
    from cxrdistill.eval.predictions import load_predictions
    from cxrdistill.eval.runs import ground_truth_of

    gt = ground_truth_of(eval_set, split)
    rows_t = load_predictions(teacher_dir / "predictions.json", gt).rows
    rows_s = load_predictions(student_dir / "predictions.json", gt).rows
    params = CocoParams(iou_thresholds=tuple(ious))
    out: dict[str, float] = {}
    for iou in ious:
        cmp = compare_detection(gt, rows_t, rows_s, params, iou=iou, n_boot=max(n_boot, 1), seed=seed)
        name = f"mAP@{iou:g}"
        out[f"teacher/{name}"] = cmp.a
        out[f"delta_teacher/{name}"] = cmp.diff
        out[f"delta_teacher/{name}_ci_low"] = cmp.ci_low
        out[f"delta_teacher/{name}_ci_high"] = cmp.ci_high
        out[f"delta_teacher/{name}_p_boot"] = cmp.p_boot
    return out


def compare_with_own_teacher(ctx: RunContext, stage: Stage, eval_set: CXRDataset, split: str, *,
                             n_boot: int, teacher_dir: Path | None = None) -> dict[str, float]:
    """:func:`teacher_comparison` of the final model (``run_dir/eval``) against its own teacher's
    evaluation (``teacher_dir``, default ``run_dir/eval_teacher``), written to ``teacher_comparison.json``."""
    comparison = teacher_comparison(eval_set, split, teacher_dir or ctx.run_dir.path / "eval_teacher",
                                    ctx.run_dir.eval, n_boot=n_boot)
    write_teacher_comparison(ctx, comparison, stage)
    return comparison


def write_teacher_comparison(ctx: RunContext, comparison: dict[str, float], stage: Stage) -> None:
    """``run_dir/teacher_comparison.json``: the own teacher's numbers and the student − teacher Δ."""
    if ctx.fabric.is_global_zero:
        write_json_atomic(ctx.run_dir.path / "teacher_comparison.json",
                          {"teacher_stage_key": stage.key, "teacher_source": stage.source,
                           **{k: (None if isinstance(v, float) and math.isnan(v) else v)
                              for k, v in comparison.items()}})


def headline(metrics: Mapping[str, Any], stage: str | None = None) -> dict[str, float]:
    """The flat headline numbers of one evaluation (an `eval.runs` metrics dict), NaN when undefined.

    The one naming of every recipe's ``final_metrics.json``: a model scored on the same kind of
    evaluation gets the same keys, whichever recipe trained it.

    - detection (`evaluate_detections`): ``mAP``, ``mAP@<iou>`` per IoU of the evaluation,
      ``AP_small`` / ``AP_medium`` / ``AP_large``, ``AR@<n>``, ``froc``, ``macro_AUROC`` with
      ``macro_AUROC_ci_low`` / ``_ci_high``; ``mAP_ci_low`` / ``_ci_high`` when the evaluation
      bootstrapped the mAP (``detection.ci95_mAP``, OXnet);
    - heat map (`evaluate_heatmap`): the detection keys (of the maps' region boxes) plus
      ``modified_froc`` and its ``modified_froc_ci_low`` / ``_ci_high`` (NaN without ``froc_boot``);
    - classification (`evaluate_image_scores`): ``macro_AUROC`` and its CI.

    ``stage``: another stage's numbers (a teacher, a pre-trained model), every key as
    ``<stage>/<key>`` (:func:`prefixed`); the run's final model is unprefixed.
    """
    out: dict[str, float] = {}
    det = metrics.get("detection") or {}
    for key, value in det.items():
        if key.startswith(("mAP", "AP_", "AR@")):
            out[key] = _float(value)
    if "ci95_mAP" in det:
        out["mAP_ci_low"], out["mAP_ci_high"] = _float(det["ci95_mAP"][0]), _float(det["ci95_mAP"][1])
    if "froc" in metrics:
        out["froc"] = _float(metrics["froc"].get("mean_score"))
    if "modified_froc_heatmaps" in metrics:
        froc = metrics["modified_froc_heatmaps"]
        ci = (froc.get("bootstrap_CI95") or {}).get("macro") or [None, None]
        out["modified_froc"] = _float(froc.get("mean_score"))
        out["modified_froc_ci_low"], out["modified_froc_ci_high"] = _float(ci[0]), _float(ci[1])
    cls = metrics.get("classification") or {}
    if "macro_AUROC" in cls:
        out["macro_AUROC"] = _float(cls["macro_AUROC"])
        ci = cls.get("macro_AUROC_CI95") or [None, None]
        out["macro_AUROC_ci_low"], out["macro_AUROC_ci_high"] = _float(ci[0]), _float(ci[1])
    return out if stage is None else prefixed(out, stage)


def prefixed(flat: Mapping[str, float], stage: str) -> dict[str, float]:
    """``flat`` with every key as ``<stage>/<key>``: another stage's numbers under the same metric names."""
    return {f"{stage}/{key}": value for key, value in flat.items()}


def stage_metrics(flat: Mapping[str, float], stage: str) -> dict[str, float]:
    """The ``<stage>/`` keys of ``flat`` without the prefix (that stage's model as the run's final model)."""
    start = f"{stage}/"
    return {key[len(start):]: value for key, value in flat.items() if key.startswith(start)}


DETECTION_KEYS = ("mAP@0.25", "mAP@0.5", "mAP@0.75")
"""The CEIRD table's columns (mAP at IoU 0.25 / 0.5 / 0.75)."""


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def print_metrics(ctx: RunContext, metrics: dict[str, float], title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, "n/a" if math.isnan(value) else f"{value:.4f}")
    ctx.console.print(table)
    # a flag on the rich Console (not one of its attributes) read back by `cxrdistill train`, which
    # then does not print them again
    setattr(ctx.console, "final_metrics_printed", True)  # noqa: B010


def evaluate_final(ctx: RunContext, evaluate: Callable[[], dict[str, Any]], title: str,
                   model: nn.Module | None = None, class_names: list[str] | None = None) -> dict[str, float]:
    """Run the final evaluation on rank 0 (it writes ``run_dir/eval``), print and return the headline.

    With `model` (and `class_names`), also export it as ``run_dir/model.pt`` for `cxrdistill predict`.
    """
    metrics: dict[str, float] = {}
    if ctx.fabric.is_global_zero:
        metrics = headline(evaluate())
        print_metrics(ctx, metrics, title)
        if model is not None and class_names is not None:
            export_model(ctx.run_dir.path / "model.pt", model, ctx.cfg.model, class_names, ctx.cfg.data.image_size)
    ctx.fabric.barrier()
    return metrics


__all__ = [
    "Augment", "BurnIn", "ClassifierHead", "DETECTION_KEYS", "Part", "TrainSets", "SUPERVISED_STAGE", "STAGE_STORE_ENV", "STAGE_VERSION", "SemiBatch", "Stage",
    "boxed_indices", "build_classifier_model", "burn_in", "evaluate_against_burn_in", "build_detector", "build_heatmap_model", "classifier_losses",
    "detector_losses", "evaluate_final", "heatmap_losses", "evaluate_stage", "fit_on", "headline",
    "image_labeled", "labeled_loader", "prefixed", "print_metrics", "stage_key", "stage_metrics", "stage_store_root", "step_generator",
    "semi_loader", "semi_losses", "split_train", "supervised_stage", "teacher_comparison", "train_classifier", "train_detector", "view_config",
    "write_teacher_comparison",
]
