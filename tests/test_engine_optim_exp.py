"""The per-epoch exponential learning-rate schedule (`train.schedule: exp`)."""

from __future__ import annotations

import pytest
import torch

from cxrdistill.config import TrainConfig
from cxrdistill.engine.optim import build_scheduler, lr_factor, with_epoch_length
from cxrdistill.errors import ConfigError


def test_exp_schedule_multiplies_the_lr_by_gamma_once_per_epoch():
    cfg = TrainConfig(schedule="exp", exp_gamma=0.9, steps_per_epoch=3, lr=1e-2)
    assert [lr_factor(s, cfg, 100) for s in range(7)] == pytest.approx([1, 1, 1, 0.9, 0.9, 0.9, 0.81])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, 100)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-2] * 3 + [9e-3] * 3 + [8.1e-3])


def test_exp_schedule_needs_an_epoch_length_and_recipes_supply_theirs():
    cfg = TrainConfig(schedule="exp", batch_size=4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        build_scheduler(opt, cfg, 10)
    assert with_epoch_length(cfg, 10).steps_per_epoch == 3  # ceil(10 / 4)
    assert with_epoch_length(cfg.model_copy(update={"steps_per_epoch": 7}), 10).steps_per_epoch == 7
