"""Configs shipped with the package, found by name: `cxrdistill train --config tsd`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cxrdistill.errors import ConfigError


def packaged_configs_dir() -> Path:
    """The folder of configs installed with the package (`configs/` in a source checkout)."""
    return Path(str(resources.files("cxrdistill") / "configs"))


def resolve_config_path(path: str | Path, kind: str = "") -> Path:
    """`path` if it exists; else a packaged config of that name (`tsd`, `tsd.yaml`, `studies/demo`)."""
    path = Path(path)
    if path.exists():
        return path
    base = packaged_configs_dir() / kind
    for candidate in (base / path, base / path.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in base.glob("*.yaml"))
    raise ConfigError(f"{path}: no such config file, and no packaged config of that name "
                      f"(packaged: {', '.join(names)})")
