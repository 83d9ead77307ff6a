"""Checkpoint files: nested dicts of tensors and plain values, written atomically, loaded safely.

`save_checkpoint` writes to a temporary file in the same directory, fsyncs it and renames it over
the target with `os.replace`, so a crash mid-write leaves the previous checkpoint intact.
`load_checkpoint` uses `torch.load(weights_only=True)`: a file that would run code when unpickled
is refused with `CheckpointError`, like a truncated or corrupt one.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from cxrdistill.atomic import atomic_write
from cxrdistill.errors import CheckpointError


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> Path:
    """Write `state` (state dicts, tensors, numbers, strings, lists, dicts) to `path` atomically."""
    return atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; `CheckpointError` if missing, truncated, corrupt or unsafe."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain values "
            f"(it could run code when unpickled). Only load checkpoints you trust, and re-save them "
            f"as state dicts. Detail: {unpickling_detail(err)}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: checkpoint is truncated or corrupt ({_first_line(err)}). Delete it to start "
            f"this stage over, or restore it from a copy."
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of state, found {type(state).__name__}")
    return state


def unpickling_detail(err: BaseException) -> str:
    """What PyTorch's weights-only unpickler refused (e.g. ``unsupported GLOBAL posix.system``),
    without its advice to re-run with ``weights_only=False`` (which would run the file's code)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    kept = [line for line in lines if "weights_only" not in line and "Weights only load failed" not in line]
    return " ".join(kept) or type(err).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_module_weights(path: Path | str, model: torch.nn.Module, name: str = "model") -> None:
    """Load a stage checkpoint's ``modules[name]`` (or a bare state dict) into ``model``.

    `CheckpointError` names the file when it holds no such module or the weights do not fit.
    """
    state = load_checkpoint(path)
    weights = state["modules"].get(name) if "modules" in state else state
    if weights is None:
        raise CheckpointError(f"{path}: holds no weights named {name!r} (has {', '.join(state['modules'])})")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its {name!r} weights do not fit this model ({err})") from err

