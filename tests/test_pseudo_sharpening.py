import math

import pytest
import torch

from cxrdistill.pseudo.sharpening import asymmetric_sharpen, kl_map_loss, sharpening_curve


def _expit(z):
    return 1 / (1 + math.exp(-z))


def _logit(p):
    return math.log(p / (1 - p))


def test_hand_computed_values_with_adaptive_strength():
    # image 0: y_max = 0.5 -> a = 4 - 3 * 0.5 = 2.5; image 1: y_max = 0.9 -> a = 1.3
    y = torch.zeros(2, 1, 4, 4)
    y[0, 0, 0, 0], y[0, 0, 1, 1], y[0, 0, 2, 2] = 0.5, 0.45, 0.1
    y[1, 0, 0, 0], y[1, 0, 1, 1] = 0.9, 0.5
    out = asymmetric_sharpen(y, t=0.4, a0=4.0)
    for (b, i, value, a) in [(0, 0, 0.5, 2.5), (0, 1, 0.45, 2.5), (1, 0, 0.9, 1.3), (1, 1, 0.5, 1.3)]:
        expected = _expit(a * _logit(value) + (1 - a) * _logit(0.4))
        assert float(out[b, 0, i, i]) == pytest.approx(max(expected, value), rel=1e-5)
    assert float(out[0, 0, 0, 0]) == pytest.approx(0.647530, abs=1e-5)  # lifted from 0.5
    assert float(out[0, 0, 2, 2]) == pytest.approx(0.1)  # below t: S(y) < y, so max keeps y


def test_identity_when_the_teacher_is_confident():
    y = torch.rand(2, 3, 8, 8) * 0.9
    y[:, :, 0, 0] = 1.0  # y_max = 1 -> a = 1
    assert torch.allclose(asymmetric_sharpen(y), y, atol=1e-5)


def test_sharpening_grows_as_the_maximum_falls():
    # the same pixel (0.5) in maps whose maxima are 0.5, 0.7, 0.9: lower max, stronger lift
    y = torch.full((3, 1, 4, 4), 0.05)
    y[:, 0, 0, 0] = 0.5
    y[1, 0, 3, 3], y[2, 0, 3, 3] = 0.7, 0.9
    lifted = asymmetric_sharpen(y)[:, 0, 0, 0]
    assert lifted[0] > lifted[1] > lifted[2] > 0.5
    # and the strength approaches a0 as y_max -> 0: S with a = a0 at the limit
    tiny = torch.tensor(1e-4)
    assert float(sharpening_curve(torch.tensor(0.6), 4.0 - 3.0 * tiny)) == pytest.approx(
        float(sharpening_curve(torch.tensor(0.6), 4.0)), rel=1e-3
    )


def test_never_below_the_teacher_map():
    torch.manual_seed(0)
    y = torch.rand(4, 2, 16, 16) ** 3
    out = asymmetric_sharpen(y)
    assert bool((out >= y).all()) and bool((out <= 1).all())


def test_curve_is_symmetric_about_one_half_and_fixes_t():
    y = torch.linspace(0.01, 0.99, 50)
    s = sharpening_curve(y, 3.0, t=0.5)
    assert torch.allclose(sharpening_curve(1 - y, 3.0, t=0.5), 1 - s, atol=1e-6)
    assert float(sharpening_curve(torch.tensor(0.4), 3.0, t=0.4)) == pytest.approx(0.4, rel=1e-5)


def test_a0_of_one_is_no_sharpening():
    y = torch.rand(2, 2, 8, 8)
    assert torch.allclose(asymmetric_sharpen(y, a0=1.0), y, atol=1e-5)


def test_kl_loss_matches_the_bernoulli_kl_and_is_zero_at_the_target():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    target = torch.rand(2, 1, 4, 4)
    q = torch.sigmoid(logits)
    reference = target * torch.log(target / q) + (1 - target) * torch.log((1 - target) / (1 - q))
    assert kl_map_loss(logits, target).item() == pytest.approx(reference.mean().item(), rel=1e-5)
    assert kl_map_loss(logits, target, reduction="sum").item() == pytest.approx(reference.sum().item(), rel=1e-5)
    assert float(kl_map_loss(torch.logit(target), target)) == pytest.approx(0.0, abs=1e-6)
    kl_map_loss(logits, target, reduction="sum").backward()
    assert torch.allclose(logits.grad, q.detach() - target, atol=1e-6)  # d KL / d logit = q - t


def test_kl_loss_mask_selects_images():
    logits = torch.zeros(2, 1, 2, 2, requires_grad=True)
    target = torch.stack([torch.full((1, 2, 2), 0.9), torch.full((1, 2, 2), 0.5)])
    mask = torch.tensor([True, False]).view(2, 1, 1, 1)
    only_first = kl_map_loss(logits[:1], target[:1])
    assert kl_map_loss(logits, target, mask).item() == pytest.approx(only_first.item())
    none = kl_map_loss(logits, target, torch.zeros(2, 1, 1, 1, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()  # still differentiable with nothing selected
