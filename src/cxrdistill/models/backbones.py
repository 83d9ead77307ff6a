"""The backbone registry, and one-channel ResNet backbones (MONAI's ResNet, 2-D).

Every backbone maps ``(B, in_channels, H, W)`` images in ``[0, 1]`` to ``[C2, C3, C4, C5]`` with
strides ``(4, 8, 16, 32)`` (``.strides``; a ResNet with ``output_stride`` 16 / 8 keeps the last
stages finer) and channels ``.out_channels``, so each one fits the RetinaNet-FPN, the heat-map FPN
and the classifier. :func:`build_backbone` names them:

==========================  =====================  =============================  ===========
name                        standard ``base_width``  C2..C5 channels (standard)   weights
==========================  =====================  =============================  ===========
resnet18 / resnet34         64                     64, 128, 256, 512              bring a file
resnet50 / resnet101        64                     256, 512, 1024, 2048           bring a file
densenet121                 64 (initial features)  256, 512, 1024, 1024           bring a file
efficientnet_lite0          32 (stem)              24, 40, 112, 320               ``imagenet``
efficientnet_lite1          32                     24, 40, 112, 320               ``imagenet``
efficientnet_lite2          32                     24, 48, 120, 352               ``imagenet``
==========================  =====================  =============================  ===========

A smaller ``base_width`` scales every channel (tiny test models). Layer names match torchvision's
ResNet (``conv1``, ``bn1``, ``layer1.0.conv1`` ...), so ImageNet weights load with
:func:`cxrdistill.models.pretrained.load_pretrained`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets.resnet import ResNet
from torch import Tensor, nn

from cxrdistill.models.frozen_bn import FrozenBatchNormMixin

#: depth -> (block type, blocks per stage)
RESNET_LAYOUTS: dict[int, tuple[str, list[int]]] = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
}

#: grey-level normalisation applied inside the model (mean / std of ImageNet's RGB means)
IMAGE_MEAN = 0.449
IMAGE_STD = 0.226

#: strides of C2, C3, C4, C5 relative to the input image
FEATURE_STRIDES: tuple[int, ...] = (4, 8, 16, 32)


class ResNetBackbone(FrozenBatchNormMixin):
    """ResNet trunk for ``(B, in_channels, H, W)`` images in ``[0, 1]``.

    Args:
        depth: 18, 34, 50 or 101.
        in_channels: image channels (1 for radiographs).
        base_width: channels of the first stage (64 in the standard ResNet; smaller values make
            tiny test models, e.g. 8).
        norm: MONAI norm spec for every normalisation layer (``"batch"`` for ImageNet weights).
        freeze_bn: keep every BatchNorm in eval mode with fixed affine parameters (the usual choice
            for detection with small batches and pretrained weights).
        output_stride: 32 (the standard trunk), 16 or 8: the last one or two stages keep their
            input resolution (stride 1, 3x3 convolutions dilated by 2 / 4 instead, as in DeepLab),
            so C5 is finer, e.g. for class activation maps. The weights are the same either way.

    ``forward`` returns ``[C2, C3, C4, C5]`` with strides ``FEATURE_STRIDES`` and channels
    ``self.out_channels``.
    """

    def __init__(
        self,
        depth: int = 18,
        in_channels: int = 1,
        base_width: int = 64,
        norm: str | tuple = "batch",
        freeze_bn: bool = False,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        if base_width < 1:
            raise ValueError(f"base_width must be positive, got {base_width}")
        block, layers = RESNET_LAYOUTS[depth]
        self.depth = depth
        self.in_channels = in_channels
        self.base_width = base_width
        self.body = ResNet(
            block=block,
            layers=layers,
            block_inplanes=[base_width, 2 * base_width, 4 * base_width, 8 * base_width],
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            feed_forward=False,
            bias_downsample=False,  # torchvision's layout: no bias in the downsample conv
            norm=norm,
        )
        expansion = 4 if block == "bottleneck" else 1
        self.out_channels: list[int] = [base_width * m * expansion for m in (1, 2, 4, 8)]
        self.strides: tuple[int, ...] = tuple(min(s, output_stride) for s in FEATURE_STRIDES)
        if output_stride == 8:
            _remove_stride(self.body.layer3, dilation=2)
        if output_stride <= 16:
            _remove_stride(self.body.layer4, dilation=32 // output_stride)
        self.freeze_batchnorm(freeze_bn)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``(B, in_channels, H, W)`` in [0, 1] -> ``[C2, C3, C4, C5]``, ``Ci`` of shape ``(B, Ci, H/2^i, W/2^i)``."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape (B, {self.in_channels}, H, W), got {tuple(images.shape)}"
            )
        x = (images - IMAGE_MEAN) / IMAGE_STD
        body = self.body
        x = body.act(body.bn1(body.conv1(x)))
        x = body.maxpool(x)
        c2 = body.layer1(x)
        c3 = body.layer2(c2)
        c4 = body.layer3(c3)
        c5 = body.layer4(c4)
        return [c2, c3, c4, c5]


#: every name ``model.backbone`` accepts -> its standard ``base_width``
BACKBONES: dict[str, int] = {
    "resnet18": 64, "resnet34": 64, "resnet50": 64, "resnet101": 64, "densenet121": 64,
    "efficientnet_lite0": 32, "efficientnet_lite1": 32, "efficientnet_lite2": 32,
}


def build_backbone(
    name: str, in_channels: int = 1, base_width: int | None = None, freeze_bn: bool = False, output_stride: int = 32
) -> nn.Module:
    """The backbone ``name`` (a key of :data:`BACKBONES`); ``base_width`` None: the standard width.

    Returns a module whose ``forward`` gives ``[C2, C3, C4, C5]`` with ``.strides`` and
    ``.out_channels``. ``output_stride`` 16 / 8 is available for the ResNets only.

    Raises:
        ValueError: unknown name, or an option this backbone does not have.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    width = BACKBONES[name] if base_width is None else int(base_width)
    if name.startswith("resnet"):
        return ResNetBackbone(int(name.removeprefix("resnet")), in_channels, width, freeze_bn=freeze_bn,
                              output_stride=output_stride)
    if output_stride != 32:
        raise ValueError(f"output_stride: only the ResNet backbones can change it ({name} is 32)")
    if name == "densenet121":
        from cxrdistill.models.densenet import DenseNetBackbone

        return DenseNetBackbone(in_channels, width, freeze_bn=freeze_bn)
    from cxrdistill.models.efficientnet import EfficientNetLiteBackbone

    return EfficientNetLiteBackbone(name, in_channels, width, freeze_bn=freeze_bn)


def backbone_name(model_cfg: Any) -> str:
    """``model.backbone`` if set, else the classifier's ``model.options.arch``, else ``resnet{model.depth}``
    (the former spellings)."""
    name = getattr(model_cfg, "backbone", None) or (getattr(model_cfg, "options", None) or {}).get("arch")
    return str(name) if name else f"resnet{model_cfg.depth}"


def _remove_stride(stage: nn.Sequential, dilation: int) -> None:
    """Turn a ResNet stage's stride-2 entry into stride 1 and dilate its 3x3 convolutions instead."""
    for module in stage.modules():
        if isinstance(module, nn.Conv2d):
            module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (dilation, dilation)
                module.padding = (dilation, dilation)


def group_norm(channels: int, max_groups: int = 32, min_group_size: int = 8) -> nn.GroupNorm:
    """GroupNorm with the most groups (``<= max_groups``, dividing ``channels``) of at least
    ``min_group_size`` channels, so even a 1x1 map (P7) has several values per group."""
    limit = max(1, min(max_groups, channels // min_group_size))
    groups = max(g for g in range(1, limit + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def conv_stack(channels: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` x (3x3 conv, GroupNorm, ReLU) keeping ``channels``; shared by the heads."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), group_norm(channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def init_normal(modules: Sequence[nn.Module] | nn.Module, std: float = 0.01) -> None:
    """Normal(0, std) weights and zero biases for every conv inside ``modules`` (head init)."""
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    for module in mods:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def prior_bias(prior: float) -> float:
    """Logit bias so that sigmoid(bias) = ``prior`` (focal-loss initialisation)."""
    return float(-torch.log(torch.tensor((1.0 - prior) / prior)))
