"""Which supervision split a run uses: a prepared manifest's own, or a re-split by `data.boxed_fraction`.

Every packaged config sets `data.boxed_fraction` for the synthetic world. On a user's manifest
(`cxrdistill prepare` already chose who keeps boxes) that default must not silently re-split it:
the manifest's split wins unless the user asked for a re-split — `data.boxed_fraction` on the
command line, or in a config file of their own. Either way one console line says which applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["apply_split_policy", "is_packaged_config"]


def is_packaged_config(path: Path | None) -> bool:
    """A config shipped with cxrdistill (the package's `configs/`, or the same file in a checkout's `configs/`)."""
    from cxrdistill.resources import packaged_configs_dir

    if path is None:
        return False
    path = Path(path).resolve()
    packaged = packaged_configs_dir().resolve()
    if packaged in path.parents:
        return True
    twin = packaged / path.parent.name / path.name if path.parent.name == "studies" else packaged / path.name
    try:
        return twin.is_file() and twin.read_bytes() == path.read_bytes()
    except OSError:
        return False


def _overridden(overrides: Sequence[str]) -> bool:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key == "data.boxed_fraction" or (key == "data" and "boxed_fraction" in item):
            return True
    return False


def apply_split_policy(data_cfg: Any, config_path: Path | None, overrides: Sequence[str]) -> str | None:
    """Drop a packaged default `boxed_fraction` on a user's manifest (in place); returns the line to
    print (None when there is nothing to say: no manifest, or no boxed_fraction)."""
    fraction = getattr(data_cfg, "boxed_fraction", None)
    if data_cfg.manifest is None or fraction is None:
        return None
    if _overridden(overrides):
        return (f"data: re-splitting the manifest's training images with data.boxed_fraction={fraction:g} "
                f"(weak_fraction={data_cfg.weak_fraction}) from the command line")
    if not is_packaged_config(config_path):
        return (f"data: re-splitting the manifest's training images with data.boxed_fraction={fraction:g} "
                f"from {Path(config_path).name if config_path else 'the config'}")
    data_cfg.boxed_fraction = None
    return (f"data: using the manifest's own split (as prepared); the packaged config's "
            f"data.boxed_fraction={fraction:g} is ignored — pass data.boxed_fraction={fraction:g} to re-split")
