"""The pretraining recipe (``method.name: pretrain``) run by `cxrdistill pretrain`.

Trains MoCo v2 or BYOL on every image of the manifest outside ``exclude_splits`` (test by default),
labels ignored, as one resumable engine stage ``pretrain``. ``knn_acc_init`` is the same kNN
accuracy of the initial weights (what pretraining must beat). Logged per step: the loss,
``images_per_s`` and ``feature_std`` (a warning when it falls below ``collapse_ratio`` of the
well-spread value); every ``train.eval_every`` steps and at the end, ``eval/knn_acc``: the
leave-one-out kNN balanced accuracy of the backbone's pooled features on the images that carry
labels. Output: ``RUN_DIR/model.safetensors`` (the backbone alone, in the layout the pretrained
loader reads, so ``model.pretrained=RUN_DIR`` loads it) and ``RUN_DIR/pretrain.json``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cxrdistill.atomic import atomic_write, write_json_atomic
from cxrdistill.config import ModelConfig, RunConfig
from cxrdistill.data.dataset import collate
from cxrdistill.data.study import StudyData
from cxrdistill.engine.context import RunContext
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.engine.sampler import RatioBatchSampler
from cxrdistill.errors import ConfigError
from cxrdistill.methods.registry import register_method
from cxrdistill.ssl.augment import CXRAugment, step_generator, two_views
from cxrdistill.ssl.models import BYOL, MoCo, queue_problem
from cxrdistill.ssl.monitor import embed_all, feature_std, is_collapsed, knn_balanced_accuracy

WEIGHTS_FILE = "model.safetensors"
STAGE = "pretrain"


class PretrainParams(BaseModel):
    """`method.params` of ``pretrain``."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["moco_v2", "byol"] = "moco_v2"
    exclude_splits: list[str] = Field(default_factory=lambda: ["test"])
    """Splits never seen by pretraining (labels are ignored everywhere else)."""
    dim: int = Field(128, gt=0)
    hidden: int = Field(512, gt=0)
    queue_size: int = Field(4096, gt=0)
    momentum: float | None = Field(None, ge=0, le=1)
    """EMA of the key / target encoder (None: 0.999 for MoCo, 0.99 base for BYOL)."""
    temperature: float = Field(0.2, gt=0)
    shuffle_bn_groups: int = Field(1, ge=1)
    """MoCo only: > 1 emulates shuffle-BN on each process with that many sub-batches (1: off)."""
    crop_scale: tuple[float, float] = (0.6, 1.0)
    rotate_deg: float = Field(10.0, ge=0)
    flip_p: float = Field(0.5, ge=0, le=1)
    brightness: float = Field(0.1, ge=0)
    contrast: float = Field(0.2, ge=0, lt=1)
    knn_k: int = Field(5, gt=0)
    knn_max_images: int = Field(1000, gt=0)
    collapse_ratio: float = Field(0.1, ge=0)
    """Warn when feature_std < collapse_ratio / sqrt(dim)."""


def build_backbone_from_config(model_cfg: ModelConfig) -> nn.Module:
    """The backbone a recipe with ``model_cfg`` would build (the registry's build function when present)."""
    try:
        from cxrdistill.models.backbones import backbone_name, build_backbone
    except ImportError:  # the registry predates model.backbone: ResNets only
        from cxrdistill.models.backbones import ResNetBackbone

        return ResNetBackbone(model_cfg.depth, 1, model_cfg.base_width)
    return build_backbone(backbone_name(model_cfg), base_width=model_cfg.base_width)


def load_initial_weights(backbone: nn.Module, source: Any) -> None:
    """``model.pretrained`` into the backbone (random init when None)."""
    if source is None:
        return
    try:
        from cxrdistill.models.pretrained import load_pretrained as load
    except ImportError:
        from cxrdistill.models.pretrained import load_imagenet_resnet as load
    load(backbone, source)


def backbone_state(backbone: nn.Module) -> dict[str, Tensor]:
    """The backbone's weights in the pretrained loader's layout (a ResNet's torchvision keys)."""
    module = getattr(backbone, "body", backbone)
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def pretraining_images(data: StudyData, exclude: list[str]) -> list[str]:
    """The splits pretraining reads: every split of the manifest but ``exclude``."""
    splits = sorted({im.split for im in data.manifest.images} - set(exclude))
    if not splits:
        raise ConfigError(f"method.params.exclude_splits: {exclude} leaves no image to pretrain on")
    return splits


@register_method("pretrain", PretrainParams)
def run_pretrain(cfg: RunConfig, params: PretrainParams, ctx: RunContext) -> dict[str, float]:
    """Self-supervised pretraining of ``cfg.model``'s backbone; returns loss and kNN accuracy."""
    data = StudyData.from_config(cfg.data)
    splits = pretraining_images(data, params.exclude_splits)
    dataset = data.dataset(splits)
    if len(dataset) < 2:
        raise ConfigError(f"pretraining needs at least 2 images outside {params.exclude_splits}; found {len(dataset)}")
    if params.algorithm == "moco_v2":
        problem = queue_problem(params.queue_size, len(dataset), cfg.train.batch_size * ctx.world_size)
        if problem is not None:
            raise ConfigError(f"method.params.queue_size: {problem}")
    backbone = build_backbone_from_config(cfg.model)
    load_initial_weights(backbone, cfg.model.pretrained)
    if params.algorithm == "moco_v2":
        model: MoCo | BYOL = MoCo(backbone, params.dim, params.hidden, params.queue_size,
                                  0.999 if params.momentum is None else params.momentum, params.temperature,
                                  shuffle_bn_groups=params.shuffle_bn_groups)
    else:
        model = BYOL(backbone, params.dim, params.hidden, 0.99 if params.momentum is None else params.momentum)
    aug = CXRAugment(params.crop_scale, params.rotate_deg, params.flip_p, params.brightness, params.contrast)
    train = cfg.train
    sampler = RatioBatchSampler(list(range(len(dataset))), [], train.batch_size, 0, train.seed + 23,
                                rank=ctx.rank, world_size=ctx.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers)
    labeled = [i for i, im in enumerate(dataset.images) if im.supervision in ("box", "image")][: params.knn_max_images]
    knn_loader = DataLoader(torch.utils.data.Subset(dataset, labeled), batch_size=max(train.batch_size, 32),
                            collate_fn=collate)
    embedder = model.encoder_q[0] if isinstance(model, MoCo) else model.online[0]
    trainer = ctx.trainer(STAGE)
    clock = {"t": time.perf_counter(), "warned": -10**9}

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        v1, v2 = two_views(batch["image"], aug, train.seed, step, ctx.rank)
        if isinstance(model, MoCo):  # the shuffle-BN permutation, from (seed, step) like the views
            loss, z = model(v1, v2, generator=step_generator(train.seed, step, 3 + ctx.rank))
        else:
            loss, z = model(v1, v2)
        now = time.perf_counter()
        rate = batch["image"].shape[0] * ctx.world_size / max(now - clock["t"], 1e-9)
        clock["t"] = now
        std = feature_std(z)
        if is_collapsed(std, z.shape[1], params.collapse_ratio) and step - clock["warned"] >= train.log_every:
            clock["warned"] = step
            ctx.console.print(f"[yellow]warning:[/] step {step}: feature std across the batch is {std:.4f} "
                              f"(< {params.collapse_ratio:g}/sqrt({z.shape[1]})): the encoder may be collapsing; "
                              f"lower train.lr or check the augmentations", highlight=False, soft_wrap=True)
        return {params.algorithm: loss, "log_images_per_s": torch.tensor(rate), "log_feature_std": torch.tensor(std)}

    def on_step_end(step: int) -> None:
        if isinstance(model, MoCo):
            model.update_key_encoder()
        else:
            model.update_target(step, train.max_steps)

    def evaluate() -> dict[str, float]:
        if not labeled:
            return {"knn_acc": math.nan}
        feats, labels = embed_all(embedder, knn_loader, ctx.device)
        return {"knn_acc": knn_balanced_accuracy(feats, labels, params.knn_k)}

    initial = evaluate()["knn_acc"]  # the initial weights (random: the same for every resume of this seed)
    model.train()
    started = time.perf_counter()
    result = trainer.fit(step_fn, {"model": model}, build_optimizer(model.online_parameters(), train), loader,
                         train.max_steps, sampler=sampler, on_step_end=on_step_end, evaluate=evaluate)
    metrics = {"knn_acc": float(result.metrics.get("knn_acc", math.nan)), "knn_acc_init": float(initial)}
    if ctx.fabric.is_global_zero:
        from safetensors.torch import save

        payload = save(backbone_state(model.backbone))
        atomic_write(ctx.run_dir.path / WEIGHTS_FILE, lambda handle: handle.write(payload))
        write_json_atomic(ctx.run_dir.path / "pretrain.json", {
            "algorithm": params.algorithm, "model": cfg.model.model_dump(mode="json"), "splits": splits,
            "n_images": len(dataset), "n_knn_images": len(labeled), "steps": result.step,
            "seconds_this_run": time.perf_counter() - started, **metrics,
            "weights": WEIGHTS_FILE})
    ctx.fabric.barrier()
    return metrics
