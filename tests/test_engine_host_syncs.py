"""The training step without per-step host syncs: the dense box loss equals the indexed one, one
combined target check still names the bad image, and deferred NaN checks still name the step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cxrdistill.models.detector as detector
from cxrdistill.config import TrainConfig
from cxrdistill.engine.logging import read_metrics
from cxrdistill.engine.loop import NonFiniteLossError, Trainer
from cxrdistill.engine.optim import build_optimizer
from cxrdistill.engine.run_dir import RunDirectory
from cxrdistill.models.detector import RetinaNet
from cxrdistill.models.losses import giou_loss


def _tiny(box_loss: str) -> RetinaNet:
    torch.manual_seed(0)
    return RetinaNet(3, depth=18, base_width=8, fpn_channels=16, fpn_levels=(3, 4), head_convs=1, box_loss=box_loss)


def _indexed_box_loss(model: RetinaNet, out, targets, weights) -> torch.Tensor:
    """The box loss over `positive.nonzero()` (the implementation before the dense one)."""
    boxes, _, scores = detector._pad_targets(targets, model.num_classes, out.anchors.device, torch.float32)
    matches = model.match(out, targets)
    matched = torch.stack([m.matched_idx for m in matches]).clamp(min=0)
    positive = torch.stack([m.positive for m in matches])
    normaliser = (positive.sum(1) * (weights > 0)).sum().clamp(min=1).float()
    b, a = positive.nonzero(as_tuple=True)
    gt, anchors, deltas = boxes[b, matched[b, a]], out.anchors[a], out.box_deltas.float()[b, a]
    if model.box_loss_kind == "giou":
        each = giou_loss(model.box_coder.decode_single(deltas, anchors), gt)
    else:
        each = F.smooth_l1_loss(deltas, model.box_coder.encode_single(gt, anchors), beta=model.smooth_l1_beta,
                                reduction="none").sum(-1)
    return (each * weights[b] * scores.gather(1, matched)[b, a]).sum() / normaliser


@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])
def test_dense_masked_box_loss_equals_the_indexed_one(box_loss):
    model = _tiny(box_loss)
    out = model(torch.rand(3, 1, 64, 64))
    targets = [{"boxes": torch.tensor([[4.0, 4, 30, 28], [20, 30, 60, 62]]), "labels": torch.tensor([0, 2]),
                "scores": torch.tensor([0.9, 0.4])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},  # no box: padding only
               {"boxes": torch.tensor([[10.0, 12, 40, 50]]), "labels": torch.tensor([1])}]
    weights = torch.tensor([1.0, 0.5, 2.0])
    box = model.loss(out, targets, weights)["box"]
    assert box > 0 and torch.isfinite(box)
    assert box.item() == pytest.approx(_indexed_box_loss(model, out, targets, weights).item(), rel=1e-5)
    box.backward()  # finite gradients although the padded (zero) boxes enter the dense computation
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_combined_target_check_and_the_per_image_debug_option_name_the_image(monkeypatch):
    model = _tiny("smooth_l1")
    out = model(torch.rand(2, 1, 64, 64))
    good = {"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([0])}
    bad_score = {**good, "scores": torch.tensor([1.5])}
    for per_image in (False, True):
        monkeypatch.setattr(detector, "CHECK_TARGETS_PER_IMAGE", per_image)
        with pytest.raises(ValueError, match=r"target 1: scores must be \(1,\) in \[0, 1\]"):
            model.loss(out, [good, bad_score])
        with pytest.raises(ValueError, match="target 0: every box"):
            model.loss(out, [{"boxes": torch.tensor([[9.0, 1, 1, 9]]), "labels": torch.tensor([0])}, good])
        with pytest.raises(ValueError, match="target 1: labels must lie in"):
            model.loss(out, [good, {"boxes": good["boxes"], "labels": torch.tensor([3])}])


def test_deferred_nan_check_names_the_step_and_logs_every_n_steps(tmp_path):
    """With the accelerator's behaviour (no per-step check), a NaN at step 3 is reported at the
    log step 5 (log_every=5), naming step 3; before it, the logged window has the loss means."""
    cfg = TrainConfig(max_steps=20, lr=0.05, log_every=5, checkpoint_every=100, progress=False, tensorboard=False,
                      schedule="constant", warmup_steps=0)
    model = nn.Linear(2, 1)
    trainer = Trainer(cfg, RunDirectory(tmp_path, min_free_bytes=0), "nan")
    trainer.check_every_step = False
    seen = []

    def step_fn(batch, step):
        seen.append(step)
        bad = torch.tensor(float("nan")) if step == 7 else torch.tensor(0.0)
        return {"ok": model(batch).pow(2).mean(), "unsup": bad + 0 * model.weight.sum()}

    batches = iter(lambda: torch.ones(2, 2), None)
    with pytest.raises(NonFiniteLossError, match=r"step 7: non-finite loss term\(s\): unsup=nan"):
        trainer.fit(step_fn, {"m": model}, build_optimizer(model.parameters(), cfg), batches, 20)
    assert seen == list(range(10))  # raised at the log step 10, not at step 7
    rows = [r for r in read_metrics(tmp_path / "metrics.csv") if r.get("loss") not in (None, "")]
    assert [int(r["step"]) for r in rows] == [5]  # one row per 5 steps, with the window's mean loss
    assert float(rows[0]["loss"]) > 0
