"""Classification tasks: how an image's multi-hot labels become a training target, and back.

An image's labels are the manifest's multi-hot ``image_labels (C,)``. A task names the model's
``K`` outputs and turns labels into targets ``(K,)`` (Martins & Silva's tasks, one per choice):

- ``multi_label``: ``K = C`` independent sigmoid outputs, target = the multi-hot itself, binary
  cross-entropy (the paper's "multi-label framework" future work, for 14-class CXR data).
- ``single_label``: one softmax class per image, as in the paper. The class is the first present
  class (ties go to the lower class index); with ``normal_class`` an image with no finding gets an
  extra last class "(no finding)" (without it, such an image is an error naming it).
- ``any_finding``: two softmax classes, "(no finding)" and "abnormal" (any class present) — the
  paper's effusion-vs-no-pathology setting applied to "any finding".

:meth:`ClassificationTask.loss` is the matching loss over the *kept* entries of a target (a mask
``(K,)`` per image: pseudo-labels supervise only what the top-κ filter kept).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cxrdistill.data.views import View
from cxrdistill.errors import ConfigError, CxrDistillError
from cxrdistill.models.classifier import masked_bce_with_logits

Task = Literal["multi_label", "single_label", "any_finding"]
NORMAL = "(no finding)"
ABNORMAL = "abnormal"
StageLosses = Callable[[dict[str, Any], View], dict[str, Tensor]]
"""``losses(batch, view) -> {name: loss}``, the view's images ``(B, 1, H, W)`` (`methods.kit.Losses`)."""


class ClassificationTask:
    """Turns multi-hot image labels ``(C,)`` into training targets ``(K,)`` and logits into probabilities."""

    def __init__(self, class_names: Sequence[str], task: Task, normal_class: bool = True) -> None:
        if task not in ("multi_label", "single_label", "any_finding"):
            raise ConfigError(f"method.params.task: unknown task {task!r}")
        self.task, self.normal_class = task, normal_class
        self.num_classes = len(class_names)
        if task == "multi_label":
            self.output_names = list(class_names)
        elif task == "single_label":
            self.output_names = list(class_names) + ([NORMAL] if normal_class else [])
        else:
            self.output_names = [NORMAL, ABNORMAL]

    @property
    def name(self) -> str:
        """The task as a short string (``single_label+normal``): part of a supervised stage's key."""
        return self.task + ("+normal" if self.task == "single_label" and self.normal_class else "")

    @property
    def num_outputs(self) -> int:
        return len(self.output_names)

    @property
    def kappa_mode(self) -> Literal["single", "multi"]:
        """How the top-κ filter treats a row (`pseudo.top_kappa`): per class, or one class per image."""
        return "multi" if self.task == "multi_label" else "single"

    def encode_batch(self, image_labels: Tensor, image_ids: Sequence[Any]) -> Tensor:
        """Targets ``(B, K)`` float32 from multi-hot ``image_labels (B, C)``; ``image_ids`` name an
        image that cannot be encoded (single_label without a normal class and no class present)."""
        labels = image_labels.float()
        if self.task == "multi_label":
            return labels
        present = labels > 0
        if self.task == "any_finding":
            return F.one_hot(present.any(dim=1).long(), 2).float()
        first = present.float().argmax(dim=1)  # first present class (argmax returns the lowest index)
        empty = ~present.any(dim=1)
        if bool(empty.any()):
            if not self.normal_class:
                image_id = image_ids[int(torch.nonzero(empty)[0])]
                raise CxrDistillError(
                    f"image {image_id}: has no class, but task single_label with normal_class=false needs one "
                    f"(set method.params.normal_class=true, or use task multi_label)")
            first = torch.where(empty, torch.full_like(first, self.num_outputs - 1), first)
        return F.one_hot(first, self.num_outputs).float()

    def encode(self, image_labels: np.ndarray, image_id: Any) -> np.ndarray:
        """Target ``(K,)`` float32 of one image from its multi-hot ``image_labels (C,)``."""
        row = torch.as_tensor(np.asarray(image_labels, np.float32))[None]
        return self.encode_batch(row, [image_id])[0].numpy()

    def probabilities(self, logits: Tensor) -> Tensor:
        """``(B, K)`` logits → probabilities: sigmoid (multi-label) or softmax."""
        return torch.sigmoid(logits) if self.task == "multi_label" else logits.softmax(dim=1)

    def loss(self, logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        """BCE over kept entries (multi-label) or cross-entropy over kept rows; soft targets allowed.

        ``logits, targets, mask``: ``(B, K)``; a softmax row is kept when its first mask entry is 1.
        """
        if self.task == "multi_label":
            return masked_bce_with_logits(logits, targets, mask)
        rows = mask[:, 0].to(logits.dtype)
        per_image = F.cross_entropy(logits, targets.to(logits.dtype), reduction="none")
        return (per_image * rows).sum() / rows.sum().clamp_min(1.0)

    def target_losses(self, model: nn.Module) -> StageLosses:
        """Losses of a batch that carries ``target``/``mask`` (a `data.target_dataset.TargetDataset`)."""

        def losses(batch: dict[str, Any], view: View) -> dict[str, Tensor]:
            images = view.images
            return {"ce": self.loss(model(images), batch["target"].to(images), batch["mask"].to(images))}

        return losses

    def stage_losses(self, model: nn.Module) -> StageLosses:
        """Losses of a plain labeled batch (``image_labels``, encoded here): the shared supervised
        stage's loss when it trains this task's head (`methods.kit.supervised_stage(head=...)`)."""

        def losses(batch: dict[str, Any], view: View) -> dict[str, Tensor]:
            images = view.images
            targets = self.encode_batch(batch["image_labels"], batch["image_id"].tolist()).to(images)
            mask = batch["has_image_labels"].to(images.dtype)[:, None].expand_as(targets)
            return {"ce": self.loss(model(images), targets, mask)}

        return losses


__all__ = ["ABNORMAL", "NORMAL", "ClassificationTask", "StageLosses", "Task"]
