"""Images with a task target and a mask: the labeled set D and the kept pseudo-labels of U.

A :class:`TargetDataset` wraps a `CXRDataset` and adds to each sample a target ``(K,)`` (a
`data.targets.ClassificationTask` encoding, or the teacher's kept pseudo-label) and a mask ``(K,)``
(1 = supervised entry). Its samples batch with `data.dataset.collate`, so the shared supervised
loop (`methods.kit.fit_on`) trains on it like on any dataset.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from cxrdistill.data.dataset import CXRDataset
from cxrdistill.data.targets import ClassificationTask
from cxrdistill.errors import CxrDistillError
from cxrdistill.pseudo.top_kappa import TopKappaSelection


def kept_entries(selection: TopKappaSelection, num_outputs: int) -> Tensor:
    """``(N, K)`` bool: the supervised entries of a selection (a kept single-label row: all of it)."""
    keep = selection.keep
    return keep if keep.dim() == 2 else keep[:, None].expand(-1, num_outputs)


class TargetDataset(Dataset):
    """Images of a `CXRDataset` with a target ``(K,)`` and a mask ``(K,)``.

    Sample: the `CXRDataset` sample (``image (1, S, S)``, ``image_id``, ...) plus ``target (K,)`` and
    ``mask (K,)`` float32.
    """

    def __init__(self, base: CXRDataset, rows: list[int], targets: Tensor, masks: Tensor) -> None:
        if not (len(rows) == len(targets) == len(masks)):
            raise ValueError("rows, targets and masks must have the same length")
        self.base, self.rows, self.targets, self.masks = base, rows, targets.float(), masks.float()

    @classmethod
    def labeled(cls, base: CXRDataset, task: ClassificationTask) -> TargetDataset:
        """The labeled set D: targets from each image's own labels, every entry supervised."""
        targets = torch.from_numpy(np.stack(
            [task.encode(base.manifest.image_labels(rec.id), rec.id) for rec in base.images]
        )) if len(base) else torch.zeros(0, task.num_outputs)
        return cls(base, list(range(len(base))), targets, torch.ones_like(targets))

    @classmethod
    def pseudo(cls, base: CXRDataset, ids: list[int], selection: TopKappaSelection,
               task: ClassificationTask) -> TargetDataset:
        """The kept pseudo-labels of U (``selection`` rows in the order of ``ids``): only the images
        with at least one kept entry."""
        keep = kept_entries(selection, task.num_outputs)
        row_of = {rec.id: row for row, rec in enumerate(base.images)}
        kept = torch.nonzero(keep.any(dim=1)).flatten().tolist()
        return cls(base, [row_of[ids[i]] for i in kept], selection.labels[kept].cpu(), keep[kept].cpu())

    def image_ids(self) -> list[int]:
        return [self.base.images[row].id for row in self.rows]

    def class_proportions(self) -> Tensor:
        """Labeled-set statistics for the top-κ filter ``(K,)``: class frequencies, or prevalences (multi)."""
        if len(self.targets) == 0:
            raise CxrDistillError("the labeled set is empty: no class proportions to balance against")
        return self.targets.mean(dim=0).double()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.base[self.rows[index]], "target": self.targets[index], "mask": self.masks[index]}


def selection_report(unlabeled: CXRDataset, ids: list[int], selection: TopKappaSelection,
                     task: ClassificationTask, *, kappa: float, soft: bool) -> dict[str, Any]:
    """What the top-κ filter kept, per output; and, when the manifest still holds the hidden labels
    of U (a simulated split), how often the kept hard labels agree with them."""
    keep = kept_entries(selection, task.num_outputs)
    hidden = torch.from_numpy(np.stack([task.encode(unlabeled.manifest.image_labels(i), i) for i in ids])) \
        if task.task != "single_label" or task.normal_class else None
    report: dict[str, Any] = {
        "kappa": kappa, "soft": soft, "n_unlabeled": len(ids),
        "n_images_kept": int(keep.any(dim=1).sum()),
        "kept_per_output": dict(zip(task.output_names, selection.counts.tolist())),
    }
    if hidden is not None and bool(hidden.any()):
        hard = (selection.labels > 0.5).float() if task.task == "multi_label" else \
            F.one_hot(selection.labels.argmax(dim=1), task.num_outputs).float()
        agree = (hard == hidden)[keep]
        report["agreement_with_hidden_labels"] = float(agree.float().mean()) if agree.numel() else None
        report["note"] = "agreement is meaningful only when the manifest kept the labels of U (simulated split)"
    return report


__all__ = ["TargetDataset", "kept_entries", "selection_report"]
