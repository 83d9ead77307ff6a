"""MoCo's shuffle-BN, emulated on one process (issue 23): exact unshuffle, no effect without BatchNorm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cxrdistill.models.backbones import ResNetBackbone
from cxrdistill.ssl.models import MoCo, shuffle_batch, shuffled_split_forward, split_forward


class NoNormBackbone(nn.Module):
    """A registry-shaped backbone (``forward`` -> list of maps, ``out_channels``) without BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, stride=2, padding=1)
        self.out_channels = [6]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.relu(self.conv(x))]


def test_unshuffle_restores_the_order_exactly():
    x = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    shuffled, inverse = shuffle_batch(x, torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled, x) and sorted(shuffled[:, 0].tolist()) == x[:, 0].tolist()
    assert torch.equal(shuffled[inverse], x)
    # through the whole key path: an order-preserving encoder gets back exactly its input order
    out = shuffled_split_forward(nn.Identity(), x, 4, torch.Generator().manual_seed(1))
    assert torch.equal(out, x)


def test_split_forward_uses_sub_batches_of_the_batch():
    seen = []

    class Record(nn.Module):
        def forward(self, x):
            seen.append(x[:, 0].tolist())
            return x

    x = torch.arange(10, dtype=torch.float32)[:, None]
    assert torch.equal(split_forward(Record(), x, 3), x)
    assert seen == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    seen.clear()
    shuffled_split_forward(Record(), x, 2, torch.Generator().manual_seed(0))
    assert len(seen) == 2 and sorted(seen[0] + seen[1]) == list(range(10)) and seen[0] != [0, 1, 2, 3, 4]


def _pair(backbone: nn.Module, groups: int) -> MoCo:
    torch.manual_seed(0)
    return MoCo(copy.deepcopy(backbone), dim=4, hidden=8, queue_size=16, momentum=0.9, shuffle_bn_groups=groups)


def test_shuffle_bn_changes_nothing_without_batch_norm():
    torch.manual_seed(0)
    backbone = NoNormBackbone()
    plain, shuffled = _pair(backbone, 1), _pair(backbone, 4)
    shuffled.load_state_dict(plain.state_dict())  # same weights, same initial queue
    v1, v2 = torch.rand(8, 1, 16, 16), torch.rand(8, 1, 16, 16)
    loss_a, q_a = plain(v1, v2)
    loss_b, q_b = shuffled(v1, v2, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and torch.allclose(q_a, q_b, atol=1e-6)
    assert torch.allclose(plain.queue, shuffled.queue, atol=1e-6) and int(plain.queue_ptr) == int(shuffled.queue_ptr)
    loss_a.backward(), loss_b.backward()
    for a, b in zip(plain.encoder_q.parameters(), shuffled.encoder_q.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_shuffle_bn_gives_keys_other_batch_statistics_with_batch_norm():
    torch.manual_seed(0)
    backbone = ResNetBackbone(18, 1, base_width=2)
    plain, shuffled = _pair(backbone, 1), _pair(backbone, 4)
    shuffled.load_state_dict(plain.state_dict())
    x = torch.rand(8, 1, 32, 32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        k_plain = plain.encoder_k(x)
        k_split = split_forward(shuffled.encoder_k, x, 4)
        k_shuffled = shuffled_split_forward(shuffled.encoder_k, x, 4, gen)
    assert not torch.allclose(k_plain, k_split, atol=1e-4)  # BN statistics per sub-batch
    assert not torch.allclose(k_split, k_shuffled, atol=1e-4)  # ... of other images than the query's
    # a shuffled key is the key of its own image, in a sub-batch of the same images as without shuffle
    shuffled_x, inverse = shuffle_batch(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = split_forward(shuffled.encoder_k, shuffled_x, 4)[inverse]
    assert torch.equal(k_shuffled, expected)


def test_shuffle_bn_groups_must_be_positive():
    with pytest.raises(ValueError, match="shuffle_bn_groups"):
        MoCo(NoNormBackbone(), dim=4, hidden=8, queue_size=8, shuffle_bn_groups=0)
