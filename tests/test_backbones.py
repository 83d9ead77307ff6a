"""The backbone registry: every backbone builds under every head and trains (forward + backward)."""

from __future__ import annotations

import pytest
import torch

from cxrdistill.config import ModelConfig
from cxrdistill.errors import ConfigError
from cxrdistill.models.backbones import BACKBONES, build_backbone
from cxrdistill.models.efficientnet import EfficientNetLite, round_filters
from cxrdistill.models.factory import build_model


def tiny_width(name: str) -> int:
    return BACKBONES[name] // 8


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_maps_have_documented_strides(name):
    backbone = build_backbone(name, base_width=tiny_width(name))
    feats = backbone(torch.rand(2, 1, 64, 64))
    assert [f.shape[1] for f in feats] == backbone.out_channels
    assert [64 // f.shape[-1] for f in feats] == list(backbone.strides) == [4, 8, 16, 32]


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("kind", ["detector", "heatmap", "classifier"])
def test_every_backbone_trains_under_every_head(name, kind):
    torch.manual_seed(0)
    options = {"detector": {"fpn_channels": 16, "head_convs": 1, "fpn_levels": [3, 4, 5]},
               "heatmap": {"fpn_channels": 16}, "classifier": {}}[kind]
    cfg = ModelConfig(kind=kind, backbone=name, base_width=tiny_width(name), options=options)
    model = build_model(cfg, num_classes=2)
    images = torch.rand(2, 1, 64, 64)
    if kind == "detector":
        targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([1])}] * 2
        losses = model.loss(model(images), targets)
        loss = losses["cls"] + losses["box"]
    elif kind == "heatmap":
        loss = model(images).sigmoid().mean()
    else:
        loss = model.loss(model(images), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    loss.backward()
    first = next(p for p in model.backbone.parameters() if p.requires_grad)
    assert torch.isfinite(loss) and first.grad is not None and first.grad.abs().sum() > 0


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ValueError, match="unknown backbone 'vit'.*efficientnet_lite0"):
        ModelConfig(backbone="vit")
    with pytest.raises(ConfigError, match="only the ResNet"):
        build_model(ModelConfig(kind="classifier", backbone="efficientnet_lite0", base_width=8,
                                options={"output_stride": 16}), 2)


def test_efficientnet_lite_matches_the_published_architecture():
    # the stage table of the issue: Lite0 has 4.65 M parameters and 296 state-dict entries with
    # lukemelas names; Lite2 widens the stages (rounded to multiples of 8) but not stem / head
    lite0 = EfficientNetLite("efficientnet_lite0")
    assert sum(p.numel() for p in lite0.parameters()) == 4_652_008
    assert len(lite0.state_dict()) == 296  # 49 BatchNorms with their step counters, as in the wheel
    assert lite0._blocks[0]._depthwise_conv.weight.shape == (32, 1, 3, 3) and not lite0._blocks[0].has_expand
    lite2 = EfficientNetLite("efficientnet_lite2")
    assert len(lite2._blocks) == 21 and lite2.stage_channels == [16, 24, 48, 88, 120, 208, 352]
    assert lite2._conv_head.weight.shape == (1280, 352, 1, 1) and lite2._conv_stem.weight.shape[0] == 32
    assert [round_filters(c, 1.1) for c in (40, 112, 192)] == [48, 120, 208]
    bn = lite0._bn0
    assert bn.eps == 1e-3


def test_same_padding_is_asymmetric_like_tensorflow():
    # a stride-2 3x3 conv on an even input pads 0 on top/left and 1 on bottom/right (TF "SAME")
    from cxrdistill.models.efficientnet import SameConv2d

    conv = SameConv2d(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap
    x = torch.arange(16.0).view(1, 1, 4, 4) + 1
    y = conv(x)
    assert y.shape == (1, 1, 2, 2)
    assert y[0, 0, 0, 0] == x[0, 0, 0, 0]  # no top/left padding: the tap lands on pixel (0, 0)
