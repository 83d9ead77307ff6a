"""train.nan_policy=rollback: a NaN loss reloads the last checkpoint and lowers the learning rate."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cxrdistill.config import TrainConfig
from cxrdistill.engine.logging import read_metrics
from cxrdistill.engine.loop import NonFiniteLossError, Trainer
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.engine.run_dir import RunDirectory
from cxrdistill.engine.sampler import RatioBatchSampler


def _run(tmp_path, policy: str, nan_steps: set[int]):
    cfg = TrainConfig(max_steps=10, lr=0.05, checkpoint_every=4, log_every=1, schedule="constant",
                      tensorboard=False, progress=False, nan_policy=policy, rollback_lr_factor=0.5)
    torch.manual_seed(0)
    x = torch.randn(20, 3)
    model = nn.Linear(3, 1)
    sampler = RatioBatchSampler(range(20), [], 4, 0, seed=0)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_sampler=sampler)
    optimizer = build_optimizer(model.parameters(), cfg)
    trainer = Trainer(cfg, RunDirectory(tmp_path, min_free_bytes=0), "toy")
    seen: list[int] = []

    def step_fn(batch, step):
        seen.append(step)
        loss = ((model(batch[0]) - batch[1]) ** 2).mean()
        if step in nan_steps:
            nan_steps.discard(step)  # the batch after the rollback is fine
            return {"mse": loss * float("nan")}
        return {"mse": loss}

    result = trainer.fit(step_fn, {"model": model}, optimizer, loader, cfg.max_steps, sampler=sampler)
    return result, optimizer, seen


def test_raise_policy_names_the_step_and_term(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"step 6: non-finite loss term\(s\): mse=nan"):
        _run(tmp_path, "raise", {6})


def test_rollback_policy_reloads_last_checkpoint_with_lower_lr(tmp_path):
    result, optimizer, seen = _run(tmp_path, "rollback", {6})
    assert result.step == 10
    assert seen[:7] == [0, 1, 2, 3, 4, 5, 6] and seen[7] == 4  # back to the step-4 checkpoint
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert any(str(r.get("rollback", "")).strip() not in ("", "nan") for r in rows)
