"""Generic state-dict reading and matching, for every backbone's weight loader.

Reads a state dict from a file (``.pt`` / ``.pth`` / ``.bin`` with ``weights_only=True``, or
``.safetensors``), a Hugging Face directory or a URL; descends into the usual nestings
(``state_dict`` / ``model`` / ...) and strips wrapper prefixes (``module.`` ...); fits a first
convolution's input channels; and loads into a module after checking shapes and keys
(:func:`load_checked`, every mismatch a :class:`CheckpointError` naming the keys).

Knows no architecture: :mod:`cxrdistill.models.densenet` and :mod:`cxrdistill.models.pretrained`
(which dispatches on the backbone type) build on it.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cxrdistill.engine.checkpoint import unpickling_detail
from cxrdistill.errors import CheckpointError

URL_PREFIXES = ("http://", "https://", "file://")
#: keys under which training scripts commonly nest the state dict
NESTED_KEYS = ("state_dict", "model", "student", "teacher", "module")
#: prefixes stripped when every key carries one (DDP wrappers, timm/HF wrappers)
STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


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
    state = unnest(state)
    for prefix in STRIP_PREFIXES:
        state = _strip_prefix(state, prefix)
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}



def unnest(state: dict, prefix: str = "") -> dict:
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



def sum_rgb(state: dict[str, Tensor], own: Mapping[str, Tensor], key: str) -> None:
    """Fit a first convolution's input channels: RGB summed to grey, or grey spread over channels."""
    conv, target = state.get(key), own.get(key)
    if conv is None or target is None or conv.ndim != 4 or conv.shape[1] == target.shape[1]:
        return
    if target.shape[1] == 1:
        state[key] = conv.sum(dim=1, keepdim=True)
    elif conv.shape[1] == 1:
        state[key] = conv.repeat(1, target.shape[1], 1, 1) / target.shape[1]

