"""One pretraining per seed, shared by every recipe and label fraction (issue 23).

The pretraining reads every non-test image and ignores labels, so its weights cannot depend on
``data.boxed_fraction``; its run directory is a ``model.pretrained`` a supervised detector run starts from.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cxrdistill.cli import app

runner = CliRunner()
WORLD = ["data.synthetic={n_images: 40, image_size: 32, seed: 3}", "data.image_size=32", "model.depth=18",
         "model.base_width=4", "train.progress=false", "train.tensorboard=false"]
PRETRAIN = [*WORLD, "train.max_steps=2", "train.batch_size=8", "method.params.queue_size=16", "method.params.dim=8",
            "method.params.hidden=16"]


def _invoke(*args: str) -> None:
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output


def test_one_pretraining_serves_every_fraction_and_a_detector_starts_from_it(tmp_path: Path):
    _invoke("pretrain", "--config", "pretrain_moco", "-o", str(tmp_path / "ssl_a"), *PRETRAIN, "data.boxed_fraction=0.1")
    _invoke("pretrain", "--config", "pretrain_moco", "-o", str(tmp_path / "ssl_b"), *PRETRAIN, "data.boxed_fraction=0.2")
    a = load_file(tmp_path / "ssl_a" / "model.safetensors")
    b = load_file(tmp_path / "ssl_b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # labels never reach the weights

    # a supervised detector run (lr ~ 0, so its backbone stays where it started) on model.pretrained=RUN_DIR
    out = tmp_path / "det"
    _invoke("train", "--config", "supervised_detector", "-o", str(out), *WORLD, "data.boxed_fraction=0.2",
            "train.max_steps=1", "train.batch_size=2", "train.lr=1e-12", "train.warmup_steps=0",
            "model.options.fpn_channels=8", "model.options.head_convs=1", f"model.pretrained={tmp_path / 'ssl_a'}")
    assert f"pretrained: {tmp_path / 'ssl_a'}" in (out / "config.yaml").read_text()
    (last,) = (out / "checkpoints").glob("*/last.pt")
    state = torch.load(last, weights_only=True)["modules"]
    weights = {k: v for module in state.values() for k, v in module.items()}
    conv1 = next(v for k, v in weights.items() if k.endswith("backbone.body.conv1.weight"))
    layer = next(v for k, v in weights.items() if k.endswith("backbone.body.layer4.1.conv2.weight"))
    assert torch.allclose(conv1, a["conv1.weight"], atol=1e-6)
    assert torch.allclose(layer, a["layer4.1.conv2.weight"], atol=1e-6)
    assert not torch.allclose(conv1, torch.zeros_like(conv1))
