"""Signals a user reads during pretraining: kNN accuracy of the current features, collapse check."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader


def knn_balanced_accuracy(features: Tensor, labels: Tensor, k: int = 5) -> float:
    """Leave-one-out kNN (cosine) on ``features (N, F)`` with multi-hot ``labels (N, C)``.

    Each image's class c is predicted present when more of its ``k`` nearest other images have it
    than the class's prevalence (so rare classes are not always voted absent); returns the balanced accuracy ((TPR + TNR) / 2) averaged over the classes that have both
    positives and negatives (0.5 = chance). NaN when no class qualifies or N <= k.
    """
    n = features.shape[0]
    if n <= k:
        return math.nan
    f = F.normalize(features.double(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-math.inf)
    neighbours = sim.topk(k, dim=1).indices  # (N, k)
    votes = labels.double()[neighbours].mean(dim=1)  # (N, C)
    truth = labels > 0.5
    pred = votes > truth.double().mean(dim=0, keepdim=True)
    scores = []
    for c in range(labels.shape[1]):
        pos, neg = truth[:, c], ~truth[:, c]
        if pos.any() and neg.any():
            tpr = (pred[pos, c]).double().mean()
            tnr = (~pred[neg, c]).double().mean()
            scores.append(float((tpr + tnr) / 2))
    return sum(scores) / len(scores) if scores else math.nan


def knn_votes(memory: Tensor, memory_labels: Tensor, queries: Tensor, k: int) -> Tensor:
    """Fraction of each query's ``k`` nearest memory images (cosine) that carry each class.

    ``memory (M, F)``, ``memory_labels (M, C)`` multi-hot, ``queries (Q, F)`` -> ``(Q, C)`` in [0, 1].
    """
    k = min(k, memory.shape[0])
    sim = F.normalize(queries.double(), dim=1) @ F.normalize(memory.double(), dim=1).T
    neighbours = sim.topk(k, dim=1).indices  # (Q, k)
    return memory_labels.double()[neighbours].mean(dim=1)


def knn_auroc(memory: Tensor, memory_labels: Tensor, queries: Tensor, query_labels: Tensor, k: int) -> list[float]:
    """Per-class AUROC ``[C]`` of the :func:`knn_votes` of held-out ``queries`` against their
    ``query_labels (Q, C)``; NaN for a class whose queries are all positive or all negative."""
    from cxrdistill.eval.classification import auroc

    votes = knn_votes(memory, memory_labels, queries, k)
    return [float(v) for v in auroc(query_labels.numpy() > 0.5, votes.numpy())]


@torch.no_grad()
def embed_all(embedder: nn.Module, loader: DataLoader, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(features (N, F), labels (N, C))`` of every image of ``loader`` (eval mode, no gradient)."""
    was_training = embedder.training
    embedder.eval()
    feats, labels = [], []
    for batch in loader:
        feats.append(embedder(batch["image"].to(device)).float().cpu())
        labels.append(batch["image_labels"].float())
    embedder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def feature_std(z: Tensor) -> float:
    """Mean over dimensions of the std across the batch of L2-normalised ``z (B, D)``.

    About ``1/sqrt(D)`` for well-spread features, 0 for a collapsed encoder (every image the same).
    """
    if z.shape[0] < 2:
        return math.nan
    return float(F.normalize(z.detach().float(), dim=1).std(dim=0).mean())


def is_collapsed(std: float, dim: int, ratio: float) -> bool:
    """True when ``std`` is below ``ratio / sqrt(dim)`` (``ratio`` of the well-spread value)."""
    return math.isfinite(std) and std < ratio / math.sqrt(dim)
