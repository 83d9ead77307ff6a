"""A held-out kNN probe of pretraining on the synthetic world (the measurement behind issue 23's test).

The world's train + val images are the pretraining images (labels ignored); a kNN whose memory is
the train images with their labels scores the held-out test images, which pretraining never sees.
`run_probe` measures the same network at its random init and after a short pretraining, with the
BatchNorm statistics of both recalibrated on the pretraining images (so the weights are the only
difference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cxrdistill.models.backbones import ResNetBackbone
from cxrdistill.ssl.augment import CXRAugment, two_views
from cxrdistill.ssl.models import BYOL, Embedder, MoCo, queue_problem
from cxrdistill.ssl.monitor import knn_auroc

#: the probe's task: the two large lesions of the synthetic world, visible at 32 px
LARGE_LESIONS = ("cardiomegaly", "pleural effusion")


@dataclass(frozen=True)
class ProbeSetting:
    """World, network and pretraining of one probe."""

    n_images: int = 400
    image_size: int = 32
    splits: tuple[float, ...] = (0.7, 0.15, 0.15)
    """train / val / test fractions of the world: pretraining reads train + val, kNN queries are test."""
    width: int = 8
    algorithm: str = "moco_v2"
    steps: int = 150
    batch_size: int = 64
    lr: float = 0.06
    optimizer: str = "sgd"
    queue_size: int = 256
    temperature: float = 0.2
    momentum: float = 0.99
    dim: int = 64
    hidden: int = 256
    crop_scale: tuple[float, float] = (0.6, 1.0)
    rotate_deg: float = 10.0
    brightness: float = 0.1
    contrast: float = 0.2
    knn_k: int = 10
    shuffle_bn: int = 1


@dataclass
class WorldTensors:
    """``images (N, 1, S, S)`` in [0, 1], ``labels (N, C)`` multi-hot, ``split`` per image, class names."""

    images: Tensor
    labels: Tensor
    split: list[str]
    classes: list[str]


def load_world_tensors(cache: Path, setting: ProbeSetting, seed: int = 0) -> WorldTensors:
    """Build (once, under ``cache``) the synthetic world of ``setting`` and read it into memory."""
    from PIL import Image

    from cxrdistill.data.manifest import load_manifest
    from cxrdistill.data.study import synthetic_world

    path = synthetic_world({"n_images": setting.n_images, "image_size": setting.image_size, "seed": seed,
                            "splits": list(setting.splits)},
                           Path(cache))
    manifest = load_manifest(path)
    images, labels, split = [], [], []
    for rec in manifest.images:
        pixels = np.asarray(Image.open(manifest.root / rec.file_name), dtype=np.float32) / 65535.0
        images.append(torch.from_numpy(pixels)[None])
        labels.append(torch.from_numpy(manifest.image_labels(rec.id)))
        split.append(rec.split)
    return WorldTensors(torch.stack(images), torch.stack(labels).float(), split, manifest.class_names)


@torch.no_grad()
def recalibrated_features(backbone: nn.Module, calibrate: Tensor, images: Tensor, batch: int = 128) -> Tensor:
    """Pooled last-map features ``(N, F)`` of ``images`` after resetting every BatchNorm's running
    statistics to the exact mean / variance over ``calibrate`` (train-mode passes, cumulative average)."""
    net = Embedder(backbone)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    for i in range(0, calibrate.shape[0], batch):
        net(calibrate[i:i + batch])
    net.eval()
    feats = torch.cat([net(images[i:i + batch]) for i in range(0, images.shape[0], batch)])
    for m, (momentum, mean, var) in zip(bns, saved):  # leave the network as it was
        m.momentum = momentum
        m.running_mean.copy_(mean), m.running_var.copy_(var)
    return feats


def probe_score(backbone: nn.Module, world: WorldTensors, setting: ProbeSetting,
                classes: tuple[str, ...] = LARGE_LESIONS) -> dict[str, float]:
    """Held-out kNN AUROC (memory: train images, queries: test images) on ``classes`` and on all classes."""
    train = [i for i, s in enumerate(world.split) if s == "train"]
    test = [i for i, s in enumerate(world.split) if s == "test"]
    pretrain = [i for i, s in enumerate(world.split) if s != "test"]
    feats = recalibrated_features(backbone, world.images[pretrain], world.images)
    per_class = knn_auroc(feats[train], world.labels[train], feats[test], world.labels[test], setting.knn_k)
    chosen = [per_class[world.classes.index(c)] for c in classes]
    finite = [v for v in per_class if math.isfinite(v)]
    return {"task_auroc": sum(chosen) / len(chosen), "all_auroc": sum(finite) / len(finite)}


def instance_scores(backbone: nn.Module, world: WorldTensors, setting: ProbeSetting, seed: int = 12345) -> dict[str, float]:
    """Instance discrimination on the held-out test images, from two views of each (``setting``'s
    augmentation, a fixed ``seed``) through the pooled backbone features (BN recalibrated):

    - ``instance_top1``: fraction whose second view is the nearest (cosine) to its first view among
      all test images' second views (chance 1 / N);
    - ``instance_auroc``: mean over images of the fraction of other images' second views less
      similar to its first view than its own second view (chance 0.5, perfect 1).
    """
    import torch.nn.functional as F

    test = world.images[[i for i, s in enumerate(world.split) if s == "test"]]
    pretrain_images = world.images[[i for i, s in enumerate(world.split) if s != "test"]]
    aug = CXRAugment(setting.crop_scale, setting.rotate_deg, 0.5, setting.brightness, setting.contrast)
    v1, v2 = two_views(test, aug, seed, 0)
    f1 = F.normalize(recalibrated_features(backbone, pretrain_images, v1).double(), dim=1)
    f2 = F.normalize(recalibrated_features(backbone, pretrain_images, v2).double(), dim=1)
    sim = f1 @ f2.T  # (N, N), positives on the diagonal
    n = sim.shape[0]
    positive = sim.diagonal()[:, None]
    off = ~torch.eye(n, dtype=torch.bool)
    below = ((sim < positive) & off).double().sum(dim=1) / (n - 1)
    top1 = sim.argmax(dim=1) == torch.arange(n)
    return {"instance_top1": float(top1.double().mean()), "instance_auroc": float(below.mean())}


def pretrain(backbone: nn.Module, images: Tensor, setting: ProbeSetting, seed: int) -> tuple[nn.Module, list[float]]:
    """``setting.steps`` steps of MoCo v2 / BYOL on ``images (N, 1, S, S)``; returns the model and its losses."""
    torch.manual_seed(seed)
    if setting.algorithm == "moco_v2":
        problem = queue_problem(setting.queue_size, images.shape[0], setting.batch_size)
        if problem is not None:
            raise ValueError(f"queue_size: {problem}")
        model: MoCo | BYOL = MoCo(backbone, setting.dim, setting.hidden, setting.queue_size, setting.momentum,
                                  setting.temperature, shuffle_bn_groups=setting.shuffle_bn)
    else:
        model = BYOL(backbone, setting.dim, setting.hidden, setting.momentum)
    params = model.online_parameters()
    if setting.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=setting.lr, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=setting.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(setting.steps, 1))
    aug = CXRAugment(setting.crop_scale, setting.rotate_deg, 0.5, setting.brightness, setting.contrast)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(setting.steps):
        idx = torch.randperm(images.shape[0], generator=gen)[: setting.batch_size]
        v1, v2 = two_views(images[idx], aug, seed, step)
        if isinstance(model, MoCo):
            loss, _ = model(v1, v2, generator=torch.Generator().manual_seed(seed * 100_003 + step))
        else:
            loss, _ = model(v1, v2)
        losses.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if isinstance(model, MoCo):
            model.update_key_encoder()
        else:
            model.update_target(step, setting.steps)
    return model, losses


def run_probe(world: WorldTensors, setting: ProbeSetting, seed: int) -> dict[str, float]:
    """The probe for one seed: kNN AUROCs at random init and after pretraining, and their difference."""
    torch.manual_seed(seed)
    backbone = ResNetBackbone(18, 1, base_width=setting.width)
    init = probe_score(backbone, world, setting)
    init_inst = instance_scores(backbone, world, setting)
    pretrain_images = world.images[[i for i, s in enumerate(world.split) if s != "test"]]
    _, losses = pretrain(backbone, pretrain_images, setting, seed)
    after = probe_score(backbone, world, setting)
    ssl_inst = instance_scores(backbone, world, setting)
    head = losses[: max(len(losses) // 10, 1)]
    tail = losses[-max(len(losses) // 10, 1):]
    return {"seed": seed, "loss_first": sum(head) / len(head), "loss_last": sum(tail) / len(tail), "init_task": init["task_auroc"], "ssl_task": after["task_auroc"],
            "init_all": init["all_auroc"], "ssl_all": after["all_auroc"],
            **{f"init_{k}": v for k, v in init_inst.items()}, **{f"ssl_{k}": v for k, v in ssl_inst.items()},
            "gain": after["task_auroc"] - init["task_auroc"]}
