"""Optimizer and learning-rate schedule from `TrainConfig`.

The schedule is a factor on `train.lr`, per optimizer step `s` (0-based):

    warm-up (s < warmup_steps):  (s + 1) / warmup_steps
    cosine:   min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * t)) / 2,
              t = (s - warmup_steps) / (max_steps - warmup_steps)
    step:     step_gamma ** (number of step_milestones <= s)
    exp:      exp_gamma ** floor((s - warmup_steps) / steps_per_epoch)   (per-epoch exponential decay)
    constant: 1
"""

from __future__ import annotations

import bisect
import math

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.optimizer import ParamsT

from cxrdistill.config import TrainConfig
from cxrdistill.errors import ConfigError


def build_optimizer(params: ParamsT, cfg: TrainConfig) -> torch.optim.Optimizer:
    """`cfg.optimizer` ("adamw" | "adam" | "sgd") over `params` with `cfg.lr` and `cfg.weight_decay`."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (see module docstring)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.step_gamma ** bisect.bisect_right(sorted(cfg.step_milestones), step)
    if cfg.schedule == "exp":
        if cfg.steps_per_epoch is None:
            raise ConfigError("train.schedule: exp decays once per epoch; set train.steps_per_epoch "
                              "(optimizer steps per epoch) for this recipe")
        return cfg.exp_gamma ** ((step - cfg.warmup_steps) // cfg.steps_per_epoch)
    return 1.0


def ramp_up(step: int, ramp_steps: int) -> float:
    """The Gaussian ramp-up ``exp(−5 (1 − t/T)²)`` of consistency weights (Laine & Aila; Tarvainen &
    Valpola), 1 from step T on (and when T = 0)."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return 1.0
    return math.exp(-5.0 * (1.0 - step / ramp_steps) ** 2)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, max_steps: int) -> LambdaLR:
    """A `LambdaLR` applying `lr_factor`; step it once per optimizer step."""
    lr_factor(0, cfg, max_steps)  # a misconfigured schedule fails before the first step
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))


def with_epoch_length(cfg: TrainConfig, dataset_size: int) -> TrainConfig:
    """`cfg` with `steps_per_epoch` set to ``ceil(dataset_size / batch_size)`` when it is unset (for
    recipes that train by epochs: the exp schedule then decays once per pass over their data)."""
    if cfg.steps_per_epoch is not None or dataset_size <= 0:
        return cfg
    return cfg.model_copy(update={"steps_per_epoch": math.ceil(dataset_size / cfg.batch_size)})
