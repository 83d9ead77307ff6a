"""`cxrdistill train --config pretrain_moco train.devices=2 train.strategy=ddp` end to end (issue 23).

The whole pretraining recipe under Lightning Fabric's DDP strategy on two CPU processes (gloo,
launched by Fabric itself, as a user would run it): both ranks hold the same weights at every kNN
evaluation (DDP all-reduces the gradients; the momentum encoder and the queue follow identically),
rank 0 writes the backbone once, and a run stopped on both ranks after its step-2 checkpoint and
started again ends with exactly the weights of the uninterrupted run. ~20 s per run on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxrdistill.engine.checkpoint import load_checkpoint
from cxrdistill.models.backbones import build_backbone
from cxrdistill.models.pretrained import load_pretrained
from cxrdistill.ssl.recipe import backbone_state

# Each rank prints the sum of its embedder's weights at every kNN evaluation; CRASH_AT_STEP makes
# both ranks stop (an exception, as a killed job would) when that step's views are drawn.
SCRIPT = '''
import os, sys
import cxrdistill.ssl.recipe as recipe
embed_all, two_views = recipe.embed_all, recipe.two_views

def reporting_embed_all(embedder, loader, device):
    total = sum(float(p.detach().double().sum()) for p in embedder.parameters())
    line = f"RANK {os.environ.get('LOCAL_RANK', '0')} weights {total:.12e}\\n"
    os.write(1, line.encode())  # one write: the two ranks share the pipe
    return embed_all(embedder, loader, device)

def crashing_two_views(images, aug, seed, step, rank=0):
    if step == int(os.environ.get("CRASH_AT_STEP", "-1")):
        raise SystemExit(f"stopped at step {step}")
    return two_views(images, aug, seed, step, rank)

recipe.embed_all, recipe.two_views = reporting_embed_all, crashing_two_views
from cxrdistill.cli import main
main()
'''

OVERRIDES = ["data.synthetic={n_images: 40, image_size: 32}", "data.image_size=32", "model.base_width=4",
             "train.max_steps=4", "train.batch_size=4", "train.eval_every=2", "train.checkpoint_every=2",
             "train.log_every=1", "method.params.queue_size=16", "method.params.shuffle_bn_groups=2",
             "train.progress=false", "train.tensorboard=false", "train.devices=2", "train.strategy=ddp"]


def _pretrain(script: Path, out: Path, crash_at: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("CRASH_AT_STEP", None)
    if crash_at is not None:
        env["CRASH_AT_STEP"] = str(crash_at)
    return subprocess.run([sys.executable, str(script), "train", "--config", "pretrain_moco", *OVERRIDES,
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=300, env=env)


def _weights_by_rank(stdout: str) -> dict[int, list[str]]:
    ranks: dict[int, list[str]] = {}
    for rank, total in re.findall(r"^RANK (\d) weights (\S+)$", stdout, flags=re.M):
        ranks.setdefault(int(rank), []).append(total)
    return ranks


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_pretraining_under_fabric_ddp_keeps_ranks_equal_and_resumes_exactly(tmp_path):
    script = tmp_path / "pretrain.py"
    script.write_text(SCRIPT)

    whole = _pretrain(script, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    ranks = _weights_by_rank(whole.stdout)
    assert sorted(ranks) == [0, 1] and len(ranks[0]) == 3, whole.stdout[-2000:]  # initial, step 2, step 4
    assert ranks[0] == ranks[1]  # the same weights on both ranks at every evaluation
    assert ranks[0][0] != ranks[0][-1]  # and they trained
    assert whole.stdout.count("knn_acc_init") == 1  # only rank 0 prints the final table
    info = json.loads((tmp_path / "whole" / "pretrain.json").read_text())
    assert info["steps"] == 4 and info["n_images"] > 0

    stopped = _pretrain(script, tmp_path / "resumed", crash_at=3)
    assert stopped.returncode != 0 and not (tmp_path / "resumed" / "model.safetensors").exists()
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "pretrain" / "last.pt")["step"] == 2
    resumed = _pretrain(script, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = _weights_by_rank(resumed.stdout)  # the initial weights, then step 4 only: it resumed at step 2
    assert again[0] == again[1] == [ranks[0][0], ranks[0][2]]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    backbone = build_backbone("resnet18", base_width=4)  # what a recipe's model.pretrained=RUN_DIR loads
    load_pretrained(backbone, str(tmp_path / "whole"))
    loaded = backbone_state(backbone)
    assert loaded.keys() == a.keys() and all(torch.equal(loaded[k], a[k]) for k in a)
