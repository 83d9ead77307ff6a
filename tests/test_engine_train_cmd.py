"""`cxrdistill train`: config → run directory → registered method → final metrics; resume skips."""

from __future__ import annotations

import json

import torch
from pydantic import BaseModel
from torch import nn
from typer.testing import CliRunner

from cxrdistill.cli import app
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.methods.registry import register_method

runner = CliRunner()


class LineParams(BaseModel):
    slope: float = 2.0


@register_method("train_cmd_line_fit", LineParams)
def run_line_fit(cfg, params: LineParams, ctx) -> dict[str, float]:
    """Fit y = slope * x with one weight: the learned weight must approach the slope."""
    model = nn.Linear(1, 1, bias=False)
    trainer = ctx.trainer("fit")
    x = torch.linspace(-1, 1, 16).unsqueeze(1)
    batches = iter(lambda: x, None)
    result = trainer.fit(lambda b, s: {"mse": ((model(b) - params.slope * b) ** 2).mean()}, {"line": model},
                         build_optimizer(model.parameters(), cfg.train), batches, cfg.train.max_steps)
    return {"weight": model.weight.item(), "skipped": float(result.skipped)}


CONFIG = """
train: {max_steps: 40, lr: 0.5, optimizer: sgd, momentum: 0.0, schedule: constant, progress: false,
        tensorboard: false, checkpoint_every: 10}
method: {name: train_cmd_line_fit}
"""


def test_train_runs_method_writes_run_dir_and_resume_skips(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--config", str(config), "method.params.slope=-1.5", "--output-dir", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert abs(metrics["weight"] - (-1.5)) < 0.05 and metrics["skipped"] == 0.0
    assert "final metrics" in res.output and "weight" in res.output
    assert "slope: -1.5" in (out / "config.yaml").read_text()
    assert (out / "environment.json").exists() and (out / "checkpoints" / "fit" / "done.json").exists()

    again = runner.invoke(app, ["train", "--config", str(config), "method.params.slope=-1.5", "-o", str(out)])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "final_metrics.json").read_text()) == {**metrics, "skipped": 1.0}

    fresh = runner.invoke(app, ["train", "--config", str(config), "method.params.slope=-1.5", "-o", str(out),
                                "--no-resume"])
    assert fresh.exit_code == 0 and json.loads((out / "final_metrics.json").read_text())["skipped"] == 0.0


def test_config_errors_exit_with_a_message(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    res = runner.invoke(app, ["train", "--config", str(config), "train.lr=fast", "-o", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "train.lr: expected float, got 'fast'" in res.output
    assert not (tmp_path / "r").exists()  # nothing is created for a config that does not validate
