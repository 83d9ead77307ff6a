"""Image classifier: learning, class activation maps, masked BCE, ImageNet weight loading."""

from __future__ import annotations

import math
import re

import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxrdistill.errors import CheckpointError, ConfigError
from cxrdistill.models.classifier import ImageClassifier, masked_bce_with_logits


def _train(model: ImageClassifier, images: torch.Tensor, targets: torch.Tensor, steps: int, lr: float = 1e-2) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model.loss(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _two_pattern_images(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: a bright disc somewhere; class 1: a bright horizontal bar somewhere; on noise."""
    images = 0.3 + 0.05 * torch.randn(n, 1, size, size, generator=generator)
    targets = torch.tensor([[i % 2, (i // 2) % 2] for i in range(n)], dtype=torch.float32)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        if targets[i, 0]:
            cy, cx = torch.randint(12, size - 12, (2,), generator=generator).tolist()
            images[i, 0][(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 0.9
        if targets[i, 1]:
            y = int(torch.randint(4, size - 4, (1,), generator=generator))
            images[i, 0, y - 2 : y + 2, 4:-4] = 0.9
    return images.clamp(0, 1), targets


@pytest.mark.parametrize("arch", ["densenet121", "resnet18"])
def test_tiny_classifier_overfits_eight_images(arch: str) -> None:
    torch.manual_seed(0)
    images, targets = _two_pattern_images(8, 64, torch.Generator().manual_seed(1))
    model = ImageClassifier(arch, num_classes=2, tiny=True)
    with torch.no_grad():
        before = model.loss(model.eval()(images), targets).item()
    _train(model, images, targets, steps=30)
    with torch.no_grad():
        logits = model(images)
    after = model.loss(logits, targets).item()
    assert logits.shape == (8, 2)
    assert after < 0.5 * before
    for c in range(2):
        assert roc_auc_score(targets[:, c].numpy(), logits[:, c].numpy()) > 0.99


def _lesion_images(n: int, size: int, lesion: int, generator: torch.Generator):
    """Half the images carry one bright square lesion; returns images, targets (n, 1), boxes (n, 4)."""
    images = 0.25 + 0.05 * torch.randn(n, 1, size, size, generator=generator)
    targets = torch.zeros(n, 1)
    boxes = torch.zeros(n, 4, dtype=torch.long)
    for i in range(n):
        if i % 2 == 0:
            y0, x0 = torch.randint(0, size - lesion, (2,), generator=generator).tolist()
            images[i, 0, y0 : y0 + lesion, x0 : x0 + lesion] += 0.6
            targets[i, 0] = 1.0
            boxes[i] = torch.tensor([x0, y0, x0 + lesion, y0 + lesion])
    return images.clamp(0, 1), targets, boxes


def test_cam_shape_and_peak_falls_on_the_lesion() -> None:
    torch.manual_seed(0)
    size, lesion = 128, 28
    images, targets, _ = _lesion_images(16, size, lesion, torch.Generator().manual_seed(2))
    model = ImageClassifier("resnet18", num_classes=1, tiny=True)
    _train(model, images, targets, steps=40)  # untrained: 1-5 of 8 hits

    test_images, _, boxes = _lesion_images(16, size, lesion, torch.Generator().manual_seed(3))
    positives = test_images[0::2]
    with torch.no_grad():
        cams = model.class_activation_maps(positives)
    assert cams.shape == (8, 1, size // 32, size // 32)
    stride = size // cams.shape[-1]
    hits = 0
    for cam, (x0, y0, x1, y1) in zip(cams[:, 0], boxes[0::2].tolist()):
        row, col = divmod(int(cam.argmax()), cam.shape[-1])
        # the peak cell [col*stride, (col+1)*stride) x [row*stride, ...) overlaps the lesion box
        hits += col * stride < x1 and (col + 1) * stride > x0 and row * stride < y1 and (row + 1) * stride > y0
    assert hits >= 7, f"CAM peak on the lesion in only {hits}/8 images"


def test_logits_are_mean_cam_plus_bias() -> None:
    model = ImageClassifier("densenet121", num_classes=3, tiny=True).eval()
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        cams = model.class_activation_maps(images)
        assert model.forward_features(images).shape == (2, model.num_features, 2, 2)
        torch.testing.assert_close(cams.mean(dim=(2, 3)) + model.head.bias, model(images))


def test_masked_bce_ignores_masked_entries() -> None:
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.3, 1.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss = masked_bce_with_logits(logits, targets, mask)

    def bce(x: float, t: float) -> float:
        p = 1 / (1 + math.exp(-x))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    expected = (bce(0.0, 1.0) + bce(-1.0, 0.3) + bce(3.0, 1.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[0, 0] != 0
    # what sits under the mask (even NaN) changes nothing
    other = masked_bce_with_logits(logits.detach(), torch.tensor([[1.0, float("nan")], [0.3, 1.0]]), mask)
    assert other.item() == pytest.approx(expected, rel=1e-6)
    # a sample weight of zero removes a row
    weighted = masked_bce_with_logits(logits.detach(), targets, mask, weight=torch.tensor([0.0, 1.0]))
    assert weighted.item() == pytest.approx((bce(-1.0, 0.3) + bce(3.0, 1.0)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="targets must lie in"):
        masked_bce_with_logits(logits, torch.full((2, 2), 1.5))
    with pytest.raises(ValueError, match="targets must lie in"):  # NaN where the label counts as known
        masked_bce_with_logits(logits, torch.tensor([[1.0, float("nan")], [0.3, 1.0]]))


def _as_torchvision_densenet(backbone_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a MONAI DenseNet-121 backbone state dict to torchvision's legacy keys (RGB conv0, classifier)."""
    out = {}
    for key, value in backbone_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"\.layers\.(norm|relu|conv)([12])\.", r".\1.\2.", key)
        out[key] = torch.randn_like(value)
    out["features.conv0.weight"] = torch.randn(64, 3, 7, 7)
    out["classifier.weight"] = torch.randn(1000, 1024)
    out["classifier.bias"] = torch.randn(1000)
    return out


def test_imagenet_densenet_weights_load_with_summed_rgb_kernels(tmp_path) -> None:
    source = ImageClassifier("densenet121", num_classes=2)
    state = _as_torchvision_densenet(source.backbone.state_dict())
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(state, path)

    model = ImageClassifier("densenet121", num_classes=2, pretrained=path)
    loaded = model.backbone.state_dict()
    torch.testing.assert_close(loaded["features.conv0.weight"], state["features.conv0.weight"].sum(1, keepdim=True))
    key = "features.denseblock3.denselayer7.layers.conv2.weight"
    torch.testing.assert_close(loaded[key], state["features.denseblock3.denselayer7.conv.2.weight"])

    del state["features.norm5.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing"):
        ImageClassifier("densenet121", num_classes=2, pretrained=path)


def test_imagenet_resnet_weights_load_through_pretrained_module(tmp_path) -> None:
    body_state = ImageClassifier("resnet18", num_classes=2).backbone.body.state_dict()
    state = {k: torch.randn_like(v) for k, v in body_state.items() if not k.endswith("num_batches_tracked")}
    state["conv1.weight"] = torch.randn(64, 3, 7, 7)
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(state, path)
    loaded = ImageClassifier("resnet18", num_classes=2, pretrained=path).backbone.body.state_dict()
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(loaded["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])


def test_bad_configurations_raise_clear_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        ImageClassifier("densenet121", num_classes=2, pretrained=tmp_path / "absent.pth")
    with pytest.raises(ConfigError, match="unknown classifier arch"):
        ImageClassifier("vgg16", num_classes=2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tiny"):
        ImageClassifier("densenet121", num_classes=2, tiny=True, pretrained=tmp_path / "x.pth")
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        ImageClassifier("resnet18", num_classes=2, tiny=True).loss(torch.zeros(2, 2), torch.zeros(2, 3))



@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_output_stride_makes_finer_cams_with_the_same_weights(arch: str) -> None:
    """Zhou et al. need a finer last map than stride 32: ``output_stride`` 16 / 8 keeps the weights
    (the state dicts load into each other) and only changes the resolution of C5 and the CAMs."""
    torch.manual_seed(0)
    images = torch.rand(2, 1, 64, 64)
    coarse = ImageClassifier(arch, num_classes=3, tiny=True)
    for stride in (16, 8):
        fine = ImageClassifier(arch, num_classes=3, tiny=True, output_stride=stride)
        fine.load_state_dict(coarse.state_dict())  # same parameters, same shapes
        cams = fine.class_activation_maps(images)
        assert cams.shape == (2, 3, 64 // stride, 64 // stride)
        assert fine.backbone.strides[-1] == stride
        assert torch.allclose(fine(images), fine.head(fine.forward_features(images).mean((2, 3))))
    assert coarse.class_activation_maps(images).shape == (2, 3, 2, 2)
    with pytest.raises(ConfigError, match="output_stride"):
        ImageClassifier(arch, num_classes=3, tiny=True, output_stride=4)
    with pytest.raises(ConfigError, match="output_stride"):
        ImageClassifier("densenet121", num_classes=3, tiny=True, output_stride=8)
