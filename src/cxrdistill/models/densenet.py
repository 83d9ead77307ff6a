"""DenseNet-121 trunk (MONAI's DenseNet, 2-D) returning C2..C5, and torchvision/timm weight loading.

Feature maps: C2 = dense block 1 (stride 4), C3 = dense block 2 (stride 8), C4 = dense block 3
(stride 16), C5 = ReLU(norm5(dense block 4)) (stride 32); channels 256 / 512 / 1024 / 1024 at the
standard width (``base_width`` = 64 initial features, growth 32).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch.nn.functional as F
from monai.networks.nets import DenseNet
from torch import Tensor

from cxrdistill.models.frozen_bn import FrozenBatchNormMixin
from cxrdistill.models.state_dicts import LoadReport, load_checked, read_state_dict, unnest_and_strip

IMAGE_MEAN = 0.449
IMAGE_STD = 0.226
FEATURE_STRIDES: tuple[int, ...] = (4, 8, 16, 32)
DENSENET121_BLOCKS: tuple[int, ...] = (6, 12, 24, 16)


class DenseNetBackbone(FrozenBatchNormMixin):
    """DenseNet trunk for ``(B, in_channels, H, W)`` images in ``[0, 1]``.

    Parameter names are torchvision's (``features.conv0.weight`` ...) except the dense layers,
    which MONAI nests as ``denselayerN.layers.norm1``; :func:`load_imagenet_densenet` maps them.

    Args:
        in_channels: image channels (1 for radiographs).
        base_width: initial features (64 for DenseNet-121); the growth rate is ``base_width / 2``.
        block_config: layers per dense block ((6, 12, 24, 16) for DenseNet-121).
        bn_size: bottleneck width factor (4 for DenseNet-121).
        freeze_bn: keep every BatchNorm in eval mode with fixed affine parameters.

    ``forward`` returns ``[C2, C3, C4, C5]`` (strides 4, 8, 16, 32), channels ``self.out_channels``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_width: int = 64,
        block_config: Sequence[int] = DENSENET121_BLOCKS,
        bn_size: int = 4,
        freeze_bn: bool = False,
    ) -> None:
        super().__init__()
        if base_width < 2:
            raise ValueError(f"base_width must be >= 2, got {base_width}")
        net = DenseNet(spatial_dims=2, in_channels=in_channels, out_channels=1, init_features=base_width,
                       growth_rate=base_width // 2, block_config=tuple(block_config), bn_size=bn_size)
        self.features = net.features
        self.in_channels = in_channels
        growth, channels, outs = base_width // 2, base_width, []
        for i, layers in enumerate(block_config):
            channels += layers * growth
            outs.append(channels)
            if i < len(block_config) - 1:
                channels //= 2
        self.out_channels: list[int] = outs
        self.strides: tuple[int, ...] = FEATURE_STRIDES
        self.freeze_batchnorm(freeze_bn)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``(B, in_channels, H, W)`` in [0, 1] -> ``[C2, C3, C4, C5]`` (strides 4, 8, 16, 32)."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"expected images of shape (B, {self.in_channels}, H, W), got {tuple(images.shape)}")
        f = self.features
        x = f.pool0(f.relu0(f.norm0(f.conv0((images - IMAGE_MEAN) / IMAGE_STD))))
        c2 = f.denseblock1(x)
        c3 = f.denseblock2(f.transition1(c2))
        c4 = f.denseblock3(f.transition2(c3))
        c5 = F.relu(f.norm5(f.denseblock4(f.transition3(c4))))
        return [c2, c3, c4, c5]


_DENSE_LAYER_KEY = re.compile(r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(weight|bias|running_mean|running_var)$")


def densenet_state_from_torchvision(source: dict[str, Tensor], own: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Map a torchvision / timm DenseNet state dict to MONAI names; returns (state, skipped keys).

    Accepts both key styles (``denselayer1.norm.1.weight`` and ``...norm1.weight``), skips the
    ImageNet ``classifier.*``, and sums the RGB kernels of ``conv0`` for a one-channel model.
    """
    skipped = sorted(k for k in source if not k.startswith("features."))
    state: dict[str, Tensor] = {}
    for key, value in source.items():
        if not key.startswith("features."):
            continue
        match = _DENSE_LAYER_KEY.match(key)
        state[f"{match[1]}.layers.{match[2]}{match[3]}.{match[4]}" if match else key] = value
    conv0 = state.get("features.conv0.weight")
    target = own.get("features.conv0.weight")
    if conv0 is not None and target is not None and conv0.shape[1] == 3 and target.shape[1] == 1:
        state["features.conv0.weight"] = conv0.sum(dim=1, keepdim=True)
    return state, skipped


def load_imagenet_densenet(backbone: DenseNetBackbone, path: str | Path) -> LoadReport:
    """Load torchvision ImageNet DenseNet-121 weights (``densenet121-a639ec97.pth``) into a backbone.

    Raises:
        CheckpointError: missing or unreadable file, or weights that do not cover the backbone
            (the message names missing / unexpected keys and shape mismatches).
    """
    own = backbone.state_dict()
    state, skipped = densenet_state_from_torchvision(unnest_and_strip(read_state_dict(path)), own)
    return LoadReport(loaded=load_checked(backbone, state, True, str(path)), skipped=skipped)


__all__ = ["DenseNetBackbone", "load_imagenet_densenet"]
