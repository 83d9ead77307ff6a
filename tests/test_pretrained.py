"""Pretrained weights: torchvision-format ImageNet ResNets and our own checkpoints' backbones."""

from __future__ import annotations

import pytest
import torch

from cxrdistill.errors import CheckpointError
from cxrdistill.models.backbones import ResNetBackbone
from cxrdistill.models.detector import RetinaNet
from cxrdistill.models.pretrained import load_backbone_from_checkpoint, load_imagenet_resnet

WIDTH = 8


def torchvision_resnet18_state(width: int = WIDTH, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with torchvision's ResNet-18 key names and shapes (RGB conv1, fc, no
    num_batches_tracked), written out by hand so the test does not depend on MONAI's naming."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def bn(prefix: str, c: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": rand(c), f"{prefix}.bias": rand(c),
                f"{prefix}.running_mean": rand(c), f"{prefix}.running_var": rand(c).abs() + 0.5}

    state = {"conv1.weight": rand(width, 3, 7, 7), **bn("bn1", width)}
    in_planes = width
    for stage in range(1, 5):
        planes = width * 2 ** (stage - 1)
        for block in range(2):
            p = f"layer{stage}.{block}"
            state[f"{p}.conv1.weight"] = rand(planes, in_planes if block == 0 else planes, 3, 3)
            state.update(bn(f"{p}.bn1", planes))
            state[f"{p}.conv2.weight"] = rand(planes, planes, 3, 3)
            state.update(bn(f"{p}.bn2", planes))
            if block == 0 and stage > 1:
                state[f"{p}.downsample.0.weight"] = rand(planes, in_planes, 1, 1)
                state.update(bn(f"{p}.downsample.1", planes))
        in_planes = planes
    state["fc.weight"], state["fc.bias"] = rand(1000, 8 * width), rand(1000)
    return state


def test_loads_torchvision_format_and_sums_rgb(tmp_path):
    state = torchvision_resnet18_state()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    grey = ResNetBackbone(depth=18, base_width=WIDTH)
    report = load_imagenet_resnet(grey, path)
    assert report.skipped == ["fc.bias", "fc.weight"]
    loaded = grey.body.state_dict()
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(loaded["layer3.0.downsample.0.weight"], state["layer3.0.downsample.0.weight"])
    # the one-channel model on a grey image equals the RGB model on that image repeated 3 times
    rgb = ResNetBackbone(depth=18, in_channels=3, base_width=WIDTH)
    load_imagenet_resnet(rgb, path)
    image = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))  # fixed: float32 sums differ by ~1e-3 on rare draws
    grey.eval(), rgb.eval()
    with torch.no_grad():
        torch.testing.assert_close(grey(image)[0], rgb(image.repeat(1, 3, 1, 1))[0], rtol=1e-3, atol=1e-3)


def test_nested_and_prefixed_state_dicts_load(tmp_path):
    state = {f"module.{k}": v for k, v in torchvision_resnet18_state().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    backbone = ResNetBackbone(depth=18, base_width=WIDTH)
    report = load_imagenet_resnet(backbone, tmp_path / "wrapped.pth")
    assert "layer4.1.bn2.running_var" in report.loaded


def test_clear_errors(tmp_path):
    backbone = ResNetBackbone(depth=18, base_width=WIDTH)
    with pytest.raises(CheckpointError, match="not found"):
        load_imagenet_resnet(backbone, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="cannot download"):
        load_imagenet_resnet(backbone, "http://127.0.0.1:9/cxrdistill-test-unreachable-weights.pth")
    torch.save(torchvision_resnet18_state(width=16), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_imagenet_resnet(backbone, tmp_path / "wide.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_imagenet_resnet(backbone, tmp_path / "garbage.pth")
    partial = {k: v for k, v in torchvision_resnet18_state().items() if not k.startswith("layer4")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_imagenet_resnet(backbone, tmp_path / "partial.pth")
    assert load_imagenet_resnet(backbone, tmp_path / "partial.pth", strict=False).loaded


def test_loads_backbone_of_our_checkpoint(tmp_path):
    torch.manual_seed(0)
    detector = RetinaNet(num_classes=2, base_width=WIDTH, fpn_channels=16, head_convs=1)
    torch.save({"model": detector.state_dict(), "step": 10}, tmp_path / "ckpt.pt")
    fresh = ResNetBackbone(depth=18, base_width=WIDTH)
    load_backbone_from_checkpoint(fresh, tmp_path / "ckpt.pt")
    for key, value in detector.backbone.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match="no weights with prefix"):
        load_backbone_from_checkpoint(fresh, tmp_path / "ckpt.pt", prefix="encoder.")
