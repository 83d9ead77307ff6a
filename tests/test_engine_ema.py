"""EMATeacher: the update formula on small tensors, warm-up, BatchNorm modes, no gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxrdistill.engine.ema import EMATeacher


def _linear(value: float) -> nn.Linear:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(value)
        layer.bias.fill_(value)
    return layer


def test_update_is_decay_teacher_plus_one_minus_decay_student():
    student = _linear(1.0)
    ema = EMATeacher(student, decay=0.9)
    with torch.no_grad():
        student.weight.fill_(3.0)
    ema.update(student)  # 0.9*1 + 0.1*3
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 1.2))
    ema.update(student)  # 0.9*1.2 + 0.1*3
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 1.38))
    assert torch.allclose(ema.module.bias, torch.full((1,), 1.0))  # student bias unchanged at 1
    assert int(ema.num_updates) == 2


def test_warmup_ramps_decay_linearly_from_zero():
    student = _linear(0.0)
    ema = EMATeacher(student, decay=0.9, warmup_steps=4)
    decays = []
    for value in (8.0, 4.0, 2.0, 1.0, 1.0):
        decays.append(ema.effective_decay())
        with torch.no_grad():
            student.weight.fill_(value)
        ema.update(student)
    assert decays == pytest.approx([0.0, 0.225, 0.45, 0.675, 0.9])
    expected = 0.0
    for d, value in zip(decays, (8.0, 4.0, 2.0, 1.0, 1.0)):
        expected = d * expected + (1 - d) * value
    assert ema.module.weight[0, 0].item() == pytest.approx(expected)
    assert decays[0] == 0.0  # the first update copies the student


@pytest.mark.parametrize("mode, expected_mean", [("ema", 0.5), ("copy", 1.0), ("skip", 0.0)])
def test_batchnorm_buffer_modes(mode, expected_mean):
    student = nn.BatchNorm1d(3)
    ema = EMATeacher(student, decay=0.5, bn_mode=mode)
    student.running_mean.fill_(1.0)
    student.num_batches_tracked.fill_(7)
    ema.update(student)
    assert torch.allclose(ema.module.running_mean, torch.full((3,), expected_mean))
    assert int(ema.module.num_batches_tracked) == (0 if mode == "skip" else 7)


def test_teacher_never_requires_grad_and_stays_in_eval_mode():
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMATeacher(student, decay=0.99)
    assert all(not p.requires_grad for p in ema.parameters())
    ema.train()
    assert not ema.module.training and ema.training
    out = ema(torch.randn(4, 2))
    assert out.shape == (4, 2) and not out.requires_grad


def test_state_dict_round_trip_includes_update_count():
    student = _linear(2.0)
    ema = EMATeacher(student, decay=0.5)
    ema.update(_linear(4.0))
    other = EMATeacher(_linear(0.0), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert int(other.num_updates) == 1 and torch.allclose(other.module.weight, torch.full((1, 2), 3.0))


def test_mismatched_student_is_an_error():
    ema = EMATeacher(_linear(0.0), decay=0.5)
    with pytest.raises(ValueError, match="parameter tensors"):
        ema.update(nn.Sequential(nn.Linear(2, 1), nn.Linear(1, 1)))
