"""Issue 19's baselines: the consistency Mean Teacher, Soft Teacher's box jitter, the Π-model's detach switch."""

from __future__ import annotations

import pytest
import torch

from cxrdistill.errors import ConfigError
from cxrdistill.methods.mean_teacher import consistency_loss, noisy_pair
from cxrdistill.methods.pi_model import consistency_loss as pi_consistency
from cxrdistill.methods.registry import validate_method_params
from cxrdistill.methods.unbiased_teacher import box_jitter_uncertainty
from cxrdistill.models.detector import RetinaNet


def _tiny_detector(seed: int = 0) -> RetinaNet:
    torch.manual_seed(seed)
    return RetinaNet(2, base_width=8, fpn_channels=16, head_convs=1, fpn_levels=(3, 4, 5))


def test_mean_teacher_consistency_is_zero_for_the_same_model_on_the_same_view():
    student = _tiny_detector().eval()
    images = torch.rand(2, 1, 64, 64)
    out = student(images)
    assert consistency_loss(out, student(images)).item() == pytest.approx(0.0, abs=1e-12)
    assert consistency_loss(out, student(images), box_weight=1.0).item() == pytest.approx(0.0, abs=1e-12)
    # different noise (the paper's η, η') or different weights: a positive cost, gradient to the student only
    s_in, t_in = noisy_pair(images, 0.5, torch.Generator().manual_seed(0))
    assert not torch.allclose(s_in, t_in)
    teacher = _tiny_detector(seed=1).eval()
    s_out, t_out = student(s_in), teacher(t_in)
    loss = consistency_loss(s_out, t_out)
    assert loss.item() > 0
    loss.backward()
    assert student.cls_head.out.weight.grad.abs().sum() > 0
    assert teacher.cls_head.out.weight.grad is None
    # the value: mean over anchors of the summed squared probability difference
    expected = (torch.sigmoid(s_out.cls_logits) - torch.sigmoid(t_out.cls_logits)).pow(2).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mean_teacher_rejects_the_renamed_recipes_parameters():
    assert validate_method_params("mean_teacher", {}).consistency_weight == 10.0
    with pytest.raises(ConfigError, match="unbiased_teacher"):
        validate_method_params("mean_teacher", {"threshold": 0.7})
    assert validate_method_params("unbiased_teacher", {"threshold": 0.7}).threshold == 0.7
    soft = validate_method_params("soft_teacher", {})
    assert soft.box_jitter and soft.threshold == 0.9


def test_box_jitter_spread_is_zero_when_the_teacher_regresses_every_copy_to_one_box():
    model = _tiny_detector().eval()
    out = model(torch.rand(1, 1, 64, 64))
    target = torch.tensor([[20.0, 18.0, 36.0, 40.0]])
    # deltas that decode to the target box from every anchor: a teacher sure of where the box is
    stable = model.box_coder.encode_single(target.expand(len(out.anchors), 4), out.anchors.float())
    out.box_deltas = stable[None]
    spread = box_jitter_uncertainty(model, out, [target], copies=10, scale=0.06,
                                    generator=torch.Generator().manual_seed(0))
    assert spread[0].shape == (1,) and spread[0].item() < 1e-4
    # random deltas: each jittered copy lands somewhere else -> filtered at Soft Teacher's 0.02
    out.box_deltas = torch.randn_like(out.box_deltas)
    noisy = box_jitter_uncertainty(model, out, [target], copies=10, scale=0.06,
                                   generator=torch.Generator().manual_seed(0))
    assert noisy[0].item() > 0.02
    empty = box_jitter_uncertainty(model, out, [torch.zeros(0, 4)], 10, 0.06, torch.Generator().manual_seed(0))
    assert empty[0].shape == (0,)


def test_pi_model_back_propagates_through_both_branches_unless_detached():
    z = torch.tensor([[0.2, 0.7]], requires_grad=True)
    z_tilde = torch.tensor([[0.4, 0.3]], requires_grad=True)
    pi_consistency(z, z_tilde, detach=False).backward()
    assert z.grad is not None and z_tilde.grad is not None
    assert torch.allclose(z.grad, -z_tilde.grad)  # the squared difference pulls both ways
    a = torch.tensor([[0.2, 0.7]], requires_grad=True)
    b = torch.tensor([[0.4, 0.3]], requires_grad=True)
    pi_consistency(a, b, detach=True).backward()
    assert a.grad is not None and b.grad is None
    assert validate_method_params("pi_model", {}).detach is False  # the paper's default


def _tiny_config(tmp_path, method: str, **params):
    import yaml

    cfg = {
        "data": {"synthetic": {"n_images": 40, "image_size": 32}, "image_size": 32, "cache_dir": str(tmp_path / "c"),
                 "boxed_fraction": 0.3, "weak_fraction": 0.0},
        "model": {"kind": "detector", "depth": 18, "base_width": 4,
                  "options": {"fpn_channels": 8, "head_convs": 1, "fpn_levels": [2, 3, 4],
                              "anchor_sizes": [[4], [8], [16]], "aspect_ratios": [1.0]}},
        "train": {"max_steps": 4, "batch_size": 2, "unlabeled_batch_size": 2, "progress": False,
                  "tensorboard": False, "log_every": 1},
        "method": {"name": method, "params": {"n_boot": 5, **params}},
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.mark.parametrize("method, params, logged", [
    ("mean_teacher", {"box_weight": 1.0}, "unsup/consistency"),
    ("soft_teacher", {"threshold": 0.0}, "jitter_kept_fraction"),  # τ 0: the untrained teacher's boxes reach the filter
])
def test_detection_baselines_run_end_to_end(tmp_path, method, params, logged):
    import csv

    from cxrdistill.run import run_training

    torch.set_num_threads(1)
    metrics = run_training(_tiny_config(tmp_path, method, **params), [], output_dir=tmp_path / "run")
    assert 0.0 <= metrics["mAP@0.5"] <= 1.0
    assert (tmp_path / "run" / "model.pt").is_file()
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r.get("stage") == "mean_teacher"]
    assert rows and all(r[logged] != "" for r in rows)
