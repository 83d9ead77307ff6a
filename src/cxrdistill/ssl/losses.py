"""Self-supervised losses: InfoNCE against a queue of negatives (MoCo) and BYOL's regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE: ``q (B, D)`` and its positive ``k (B, D)`` against ``queue (D, K)`` negatives.

    ``q``, ``k`` and the queue columns are expected L2-normalised. Logits are
    ``[q·k, q·queue] / temperature`` (``(B, 1 + K)``), the target is index 0; returns the mean
    cross-entropy (a scalar).
    """
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def byol_regression(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's loss ``2 - 2 cos(p, z)`` averaged over the batch; ``p, z (B, D)``, ``z`` a target (no grad)."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()
