"""Multi-label image classifiers (DenseNet-121 / ResNet from MONAI blocks) with class activation maps.

An :class:`ImageClassifier` is a convolutional backbone that maps ``(B, 1, H, W)`` images in
``[0, 1]`` to a feature map ``(B, F, h, w)``, global average pooling, and one linear layer giving
one logit per class (sigmoid head, classes are not exclusive). Because the head is linear after
average pooling, ``logits == CAM.mean((2, 3)) + bias`` with ``CAM = head.weight · features``; the
CAM weak-localisation baseline reads those maps.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet
from torch import nn

from cxrdistill.errors import CheckpointError, ConfigError
from cxrdistill.models.backbones import IMAGE_MEAN, IMAGE_STD, ResNetBackbone
from cxrdistill.models.pretrained import LoadReport, load_imagenet_resnet, read_state_dict

Arch = Literal["densenet121", "resnet18", "resnet34", "resnet50"]
ARCHS: tuple[str, ...] = ("densenet121", "resnet18", "resnet34", "resnet50")


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


class DenseNetBackbone(nn.Module):
    """DenseNet-121 trunk (MONAI) for ``(B, in_channels, H, W)`` images in ``[0, 1]``.

    Returns the last feature map after the final ReLU, ``(B, out_channels, H/32, W/32)``.
    Parameter names are torchvision's (``features.conv0.weight`` ...) except the dense layers,
    which MONAI nests as ``denselayerN.layers.norm1``; :func:`load_imagenet_densenet` maps them.

    Args:
        in_channels: image channels (1 for radiographs).
        tiny: a few-channel miniature (8 initial features, growth 4, two layers per block) for tests.
    """

    def __init__(self, in_channels: int = 1, tiny: bool = False) -> None:
        super().__init__()
        if tiny:
            cfg = dict(init_features=8, growth_rate=4, block_config=(2, 2, 2, 2), bn_size=2)
        else:
            cfg = dict(init_features=64, growth_rate=32, block_config=(6, 12, 24, 16), bn_size=4)
        net = DenseNet(spatial_dims=2, in_channels=in_channels, out_channels=1, **cfg)
        self.features = net.features
        self.out_channels: int = net.class_layers.out.in_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` in [0, 1] → ``(B, out_channels, H/32, W/32)``."""
        return F.relu(self.features((images - IMAGE_MEAN) / IMAGE_STD))


_DENSE_LAYER_KEY = re.compile(r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(weight|bias|running_mean|running_var)$")


def load_imagenet_densenet(backbone: DenseNetBackbone, path: str | Path) -> LoadReport:
    """Load torchvision ImageNet DenseNet-121 weights (``densenet121-a639ec97.pth``) into a backbone.

    Accepts both torchvision key styles (``denselayer1.norm.1.weight`` and ``...norm1.weight``) and
    maps them to MONAI's ``denselayer1.layers.norm1.weight``; skips the ImageNet ``classifier.*``;
    sums the RGB kernels of ``conv0`` for a one-channel model (a grey image is R = G = B).

    Raises:
        CheckpointError: missing or unreadable file, or weights that do not cover the backbone.
    """
    source = read_state_dict(path)
    report = LoadReport(skipped=sorted(k for k in source if not k.startswith("features.")))
    state: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        if key in report.skipped:
            continue
        match = _DENSE_LAYER_KEY.match(key)
        state[f"{match[1]}.layers.{match[2]}{match[3]}.{match[4]}" if match else key] = value
    own = backbone.state_dict()
    conv0 = state.get("features.conv0.weight")
    if conv0 is not None and conv0.shape[1] == 3 and own["features.conv0.weight"].shape[1] == 1:
        state["features.conv0.weight"] = conv0.sum(dim=1, keepdim=True)
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    if wrong or missing or unexpected:
        raise CheckpointError(
            f"{path}: not DenseNet-121 weights for this model: {len(wrong)} shape mismatches {wrong[:3]}, "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    backbone.load_state_dict(state, strict=False)
    report.loaded = sorted(state)
    return report


class ImageClassifier(nn.Module):
    """Multi-label chest X-ray classifier: backbone → global average pool → linear (one logit per class).

    Args:
        arch: ``"densenet121"``, ``"resnet18"``, ``"resnet34"`` or ``"resnet50"`` (MONAI networks).
        num_classes: number of classes ``C``.
        in_channels: image channels (1 for radiographs).
        pretrained: path to torchvision ImageNet weights for ``arch`` (never downloaded here); the
            RGB kernels of the first convolution are summed for one channel.
        tiny: a few-channel miniature of ``arch`` for tests (cannot take pretrained weights).
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
        self.backbone: DenseNetBackbone | ResNetBackbone
        if arch == "densenet121":
            if output_stride != 32:
                raise ConfigError("output_stride: only the ResNet classifiers can change it (densenet121 is 32)")
            self.backbone = DenseNetBackbone(in_channels, tiny)
            self.num_features = self.backbone.out_channels
        else:
            depth = int(arch.removeprefix("resnet"))
            try:
                self.backbone = ResNetBackbone(depth, in_channels, base_width=8 if tiny else 64,
                                               output_stride=output_stride)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            self.num_features = self.backbone.out_channels[-1]
        self.head = nn.Linear(self.num_features, num_classes)
        nn.init.zeros_(self.head.bias)
        if pretrained is not None:
            if arch == "densenet121":
                load_imagenet_densenet(self.backbone, pretrained)
            else:
                load_imagenet_resnet(self.backbone, pretrained)

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
