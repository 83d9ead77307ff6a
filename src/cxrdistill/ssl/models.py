"""MoCo v2 and BYOL around any registry backbone (``forward`` -> ``[C2..C5]``, ``.out_channels``).

Both keep a second, momentum-updated (EMA) copy of the encoder; its parameters get no gradient
and are left out of the optimizer. Queue and queue pointer are buffers, so the engine's
checkpoints carry them and a resume is exact.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cxrdistill.ssl.losses import byol_regression, info_nce


class Embedder(nn.Module):
    """Backbone + global average pool of its last map: ``(B, 1, H, W)`` -> ``(B, F)``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.dim = int(backbone.out_channels[-1])

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)[-1].mean(dim=(2, 3))


def mlp(in_dim: int, hidden: int, out_dim: int, batch_norm: bool = True) -> nn.Sequential:
    """``Linear -> (BN) -> ReLU -> Linear`` (MoCo v2's projection head; BYOL's projector / predictor)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)]
    return nn.Sequential(*layers)


@torch.no_grad()
def momentum_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online`` for every parameter; buffers copied."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


def _gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` over DDP ranks (identity on one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    world = torch.distributed.get_world_size()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def split_forward(encoder: nn.Module, x: Tensor, groups: int) -> Tensor:
    """``encoder`` on ``groups`` consecutive sub-batches of ``x (B, ...)``, outputs concatenated.

    Emulates ``groups`` GPUs on one process: each sub-batch gets its own BatchNorm statistics.
    """
    if groups <= 1:
        return encoder(x)
    return torch.cat([encoder(part) for part in torch.tensor_split(x, min(groups, x.shape[0]))])


def shuffle_batch(x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(x[perm], inverse)`` for a random permutation of the batch; ``y[inverse]`` undoes it exactly."""
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return x[perm], torch.argsort(perm)


def shuffled_split_forward(encoder: nn.Module, x: Tensor, groups: int,
                           generator: torch.Generator | None = None) -> Tensor:
    """MoCo's shuffle-BN for the key encoder, emulated on one process: shuffle the batch, run
    :func:`split_forward` on ``groups`` sub-batches, unshuffle, so a key's BatchNorm statistics come
    from other images than its query's (no intra-batch leak through BN). ``(B, ...)`` -> ``(B, D)``
    in the input order; the identity reordering when ``groups <= 1``."""
    if groups <= 1:
        return encoder(x)
    shuffled, inverse = shuffle_batch(x, generator)
    return split_forward(encoder, shuffled, groups)[inverse]


def queue_problem(queue_size: int, n_images: int, global_batch: int) -> str | None:
    """Why a MoCo queue of ``queue_size`` keys does not fit ``n_images`` read ``global_batch`` at a
    time, or None when it fits.

    The queue holds the keys of the last ``queue_size / global_batch`` steps. Once that is more than
    one pass over the data (``queue_size > n_images - global_batch``), it holds older keys of the very
    images in the batch, and InfoNCE pushes each query away from its own image: the loss rises again
    as the features get better (measured: docs/results.md §9).
    """
    limit = n_images - global_batch
    if queue_size <= limit:
        return None
    return (f"a queue of {queue_size} keys is more than one pass over the {n_images} pretraining images leaves "
            f"({n_images} - a batch of {global_batch} = {limit}): it would hold older keys of the batch's own images "
            f"as negatives. Use a queue of at most {max(limit, 0)} (MoCo-CXR: 65536 keys for 200k images), "
            f"or pretrain on more images")


class MoCo(nn.Module):
    """MoCo v2: query encoder (embedder + MLP head), momentum key encoder, queue of ``queue_size`` keys.

    ``forward(v1, v2)`` -> ``(loss, q)``: symmetric InfoNCE of the two views (each as query against
    the other's key and the queue), then the keys of ``v2`` are enqueued. ``q (B, D)`` are the
    normalised query projections of ``v1`` (for the collapse check). Call :meth:`update_key_encoder`
    after each optimizer step.

    ``shuffle_bn_groups`` > 1 emulates MoCo's shuffle-BN on one process (per DDP rank): queries
    are encoded in that many consecutive sub-batches, keys in as many sub-batches of a shuffled
    batch (``generator`` of :meth:`forward` draws the permutation), so BatchNorm cannot pair a
    query with its key through shared batch statistics.
    """

    def __init__(self, backbone: nn.Module, dim: int = 128, hidden: int = 512, queue_size: int = 4096,
                 momentum: float = 0.999, temperature: float = 0.2, symmetric: bool = True,
                 shuffle_bn_groups: int = 1) -> None:
        super().__init__()
        if shuffle_bn_groups < 1:
            raise ValueError(f"shuffle_bn_groups must be >= 1, got {shuffle_bn_groups}")
        self.shuffle_bn_groups = shuffle_bn_groups
        embed = Embedder(backbone)
        self.encoder_q = nn.Sequential(embed, mlp(embed.dim, hidden, dim, batch_norm=False))
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.momentum = momentum
        self.temperature = temperature
        self.symmetric = symmetric
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q[0].backbone

    def online_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder_q.parameters())

    @torch.no_grad()
    def update_key_encoder(self) -> None:
        momentum_update(self.encoder_k, self.encoder_q, self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys (B, D)`` (all ranks) into the queue at the pointer, wrapping around."""
        keys = _gather(keys).detach().to(self.queue.dtype)
        size = self.queue.shape[1]
        ptr = int(self.queue_ptr)
        idx = (torch.arange(keys.shape[0], device=keys.device) + ptr) % size
        self.queue[:, idx] = keys.T
        self.queue_ptr.fill_((ptr + keys.shape[0]) % size)

    def _query(self, x: Tensor) -> Tensor:
        return F.normalize(split_forward(self.encoder_q, x, self.shuffle_bn_groups), dim=1)

    @torch.no_grad()
    def _key(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return F.normalize(shuffled_split_forward(self.encoder_k, x, self.shuffle_bn_groups, generator), dim=1)

    def forward(self, v1: Tensor, v2: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        q1 = self._query(v1)
        k2 = self._key(v2, generator)
        queue = self.queue.clone().detach()
        loss = info_nce(q1, k2, queue, self.temperature)
        keys = k2
        if self.symmetric:
            q2 = self._query(v2)
            k1 = self._key(v1, generator)
            loss = 0.5 * (loss + info_nce(q2, k1, queue, self.temperature))
            keys = torch.cat([k1, k2])
        self.enqueue(keys)
        return loss, q1


class BYOL(nn.Module):
    """BYOL: online (embedder, projector, predictor) regresses the EMA target's projection of the other view.

    ``forward(v1, v2)`` -> ``(loss, z)`` with the symmetric loss and the online projections of ``v1``.
    """

    def __init__(self, backbone: nn.Module, dim: int = 128, hidden: int = 512, momentum: float = 0.99) -> None:
        super().__init__()
        embed = Embedder(backbone)
        self.online = nn.Sequential(embed, mlp(embed.dim, hidden, dim))
        self.predictor = mlp(dim, hidden, dim)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.base_momentum = momentum

    @property
    def backbone(self) -> nn.Module:
        return self.online[0].backbone

    def online_parameters(self) -> list[nn.Parameter]:
        return list(self.online.parameters()) + list(self.predictor.parameters())

    @torch.no_grad()
    def update_target(self, step: int, max_steps: int) -> None:
        """EMA with BYOL's cosine schedule ``1 - (1 - base) (cos(pi step / max) + 1) / 2``."""
        progress = min(step / max(max_steps, 1), 1.0)
        tau = 1 - (1 - self.base_momentum) * (torch.cos(torch.tensor(torch.pi * progress)).item() + 1) / 2
        momentum_update(self.target, self.online, tau)

    def forward(self, v1: Tensor, v2: Tensor) -> tuple[Tensor, Tensor]:
        z1, z2 = self.online(v1), self.online(v2)
        with torch.no_grad():
            t1, t2 = self.target(v1), self.target(v2)
        loss = byol_regression(self.predictor(z1), t2) + byol_regression(self.predictor(z2), t1)
        return loss, F.normalize(z1, dim=1)
