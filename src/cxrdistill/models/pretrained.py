"""Load pretrained weights into a :class:`~cxrdistill.models.backbones.ResNetBackbone`.

* :func:`load_imagenet_resnet` reads a torchvision-format ResNet state dict (file or URL; the RGB
  ``conv1`` is summed to one channel, ``fc`` is skipped) without importing torchvision.
* :func:`load_backbone_from_checkpoint` takes the backbone out of one of our own model checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from cxrdistill.errors import CheckpointError
from cxrdistill.models.backbones import ResNetBackbone

URL_PREFIXES = ("http://", "https://", "file://")
#: keys under which training scripts commonly nest the state dict
NESTED_KEYS = ("state_dict", "model", "student", "teacher", "module")


@dataclass
class LoadReport:
    """What a load did: keys loaded, and source keys deliberately skipped (e.g. ``fc.*``)."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def read_state_dict(path_or_url: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a file (``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=True)``,
    or ``.safetensors``) or a URL (downloaded into torch's hub cache).

    Raises:
        CheckpointError: the file is missing or unreadable, or the URL cannot be fetched.
    """
    source = str(path_or_url)
    if source.startswith(URL_PREFIXES):
        try:
            state = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=False, weights_only=True)
        except Exception as exc:  # urllib / http / hash errors all mean "no weights"
            raise CheckpointError(f"{source}: cannot download weights ({type(exc).__name__}: {exc})") from exc
        return dict(state)
    path = Path(source).expanduser()
    if path.is_dir() and (path / "model.safetensors").is_file():  # a `cxrdistill pretrain` run directory
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return dict(state)


def load_imagenet_resnet(
    backbone: ResNetBackbone | nn.Module, path_or_url: str | Path, strict: bool = True
) -> LoadReport:
    """Load torchvision-format ResNet weights (``conv1.weight``, ``layer1.0.conv1.weight``, ...)
    into ``backbone`` (a :class:`ResNetBackbone`, or a MONAI ``ResNet``).

    ``fc.*`` is skipped; a 3-channel ``conv1`` is summed over RGB for a one-channel model (the
    grey image equals R = G = B). A ``module.`` prefix and a nesting under ``state_dict`` /
    ``model`` are accepted.

    Raises:
        CheckpointError: unreadable source, shape mismatches (e.g. another depth or width), or
            (with ``strict``) keys missing on either side.
    """
    body = backbone.body if isinstance(backbone, ResNetBackbone) else backbone
    state = _strip_prefix(_unnest(read_state_dict(path_or_url)), "module.")
    report = LoadReport(skipped=sorted(k for k in state if k.startswith("fc.")))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    target_conv = body.state_dict()["conv1.weight"]
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.ndim == 4 and conv1.shape[1] != target_conv.shape[1]:
        if target_conv.shape[1] == 1:
            state["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
        elif conv1.shape[1] == 1:
            state["conv1.weight"] = conv1.repeat(1, target_conv.shape[1], 1, 1) / target_conv.shape[1]
    report.loaded = _load_checked(body, state, strict, str(path_or_url))
    return report


def load_backbone_from_checkpoint(
    backbone: ResNetBackbone,
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
    return LoadReport(loaded=_load_checked(backbone, state, strict, str(path)))


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


def _load_checked(module: nn.Module, state: dict[str, Tensor], strict: bool, source: str) -> list[str]:
    """Load ``state`` into ``module`` after checking shapes and keys; returns the loaded keys."""
    own = module.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise CheckpointError(f"{source}: {len(mismatched)} shape mismatches, e.g. {mismatched[:3]}")
    # torchvision's published weights carry no BatchNorm step counters
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source}: does not fit the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return sorted(k for k in state if k in own)
