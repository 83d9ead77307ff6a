import pytest
import torch

from cxrdistill.pseudo.soft_focal import soft_focal_loss


def test_zero_when_student_equals_teacher_even_though_bce_is_not():
    torch.manual_seed(0)
    teacher = torch.rand(2, 10, 3) * 0.98 + 0.01
    logits = torch.logit(teacher)
    assert torch.nn.functional.binary_cross_entropy(teacher, teacher) > 0.1  # the entropy
    assert soft_focal_loss(logits, teacher).item() == pytest.approx(0.0, abs=1e-9)


def test_hard_targets_reduce_to_focal_loss():
    torch.manual_seed(1)
    logits = torch.randn(2, 50, 3)
    target = (torch.rand(2, 50, 3) > 0.7).float()
    q = torch.sigmoid(logits)
    alpha, eps, gamma = 0.9, 0.05, 2.0
    # focal loss (OXnet Eq. 7) with weight alpha + eps on positives and eps on negatives
    reference = torch.where(
        target > 0,
        (alpha + eps) * (1 - q) ** gamma * -torch.log(q),
        eps * q**gamma * -torch.log(1 - q),
    ).sum()
    got = soft_focal_loss(logits, target, alpha, eps, gamma)
    assert got.item() == pytest.approx(reference.item(), rel=1e-5)


def test_normaliser_is_clamped_to_one():
    logits, teacher = torch.zeros(1, 4, 2), torch.full((1, 4, 2), 0.9)
    full = soft_focal_loss(logits, teacher, normaliser=1.0)
    assert soft_focal_loss(logits, teacher, normaliser=torch.tensor(4.0)).item() == pytest.approx(full.item() / 4)
    assert soft_focal_loss(logits, teacher, normaliser=0.0).item() == pytest.approx(full.item())


def test_gradient_moves_the_student_toward_the_teacher():
    logits = torch.tensor([[[-2.0, 2.0, 0.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.8, 0.1, 0.5]]])
    soft_focal_loss(logits, teacher).backward()
    assert logits.grad[0, 0, 0] < 0 and logits.grad[0, 0, 1] > 0  # raise the low, lower the high
    assert logits.grad[0, 0, 2].item() == pytest.approx(0.0, abs=1e-7)  # agreement: no push
    assert teacher.grad is None


def test_stable_for_extreme_logits():
    logits = torch.tensor([[[-200.0, 200.0]]], requires_grad=True)
    loss = soft_focal_loss(logits, torch.tensor([[[1.0, 0.0]]]))
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(logits.grad).all())
    assert loss.item() == pytest.approx(0.95 * 200 + 0.05 * 200, rel=1e-4)
