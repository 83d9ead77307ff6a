"""A stand-in for `CXRDataset` for benches at archive scale: no manifest, no decoding.

`generate_pseudo_labels` needs ``len(ds)``, ``ds.images[i].id`` and samples that `collate` can
batch; this gives exactly that, with images taken from a small pool of random tensors so that
building 100k samples costs neither time nor memory (the real dataset reads a memory-mapped
cache row instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

_NO_BOXES = torch.zeros(0, 4)
_NO_LABELS = torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class _Image:
    id: int


class _Images:
    """``images[i].id == first_id + i`` without a list of records (O(1) memory)."""

    def __init__(self, n: int, first_id: int = 1) -> None:
        self.n, self.first_id = n, first_id

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> _Image:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return _Image(self.first_id + i)

    def __iter__(self):
        return (_Image(self.first_id + i) for i in range(self.n))


class SyntheticUnlabeled(Dataset):
    """``n`` unlabeled ``(1, size, size)`` images (a pool of ``pool`` random ones, reused)."""

    def __init__(self, n: int, size: int, num_classes: int = 2, pool: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.rand(pool, 1, size, size, generator=g)
        self.images = _Images(n)
        self.image_labels = torch.zeros(num_classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.pool[index % len(self.pool)], "boxes": _NO_BOXES, "labels": _NO_LABELS,
                "image_labels": self.image_labels, "has_boxes": False, "has_image_labels": False,
                "image_id": self.images[index].id, "report": ""}
