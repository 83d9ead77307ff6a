"""The run directory: one folder holding everything a run produces.

```
<output_dir>/
  config.yaml        the resolved config (every default filled in)
  environment.json   python / torch / monai / ... versions, git commit (no host names)
  metrics.csv        one row per logged step: step, stage, loss terms, eval metrics, counts
  logs/              TensorBoard event files, text logs
  checkpoints/<stage>/last.pt, best.pt, done.json
  eval/              predictions and evaluation outputs
```

The directory is checked up front for write access and free space, so a full disk fails in the
first second rather than at the first checkpoint hours later.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrdistill.errors import CxrDistillError

if TYPE_CHECKING:
    from cxrdistill.config import RunConfig

DEFAULT_MIN_FREE_BYTES = 1 << 30  # 1 GiB


class RunDirectory:
    """Creates and names the files of one run; `path` may already exist (resume)."""

    def __init__(self, path: Path | str, *, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES) -> None:
        self.path = Path(path)
        try:
            for sub in (self.path, self.logs, self.checkpoints, self.eval):
                sub.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CxrDistillError(f"{self.path}: cannot create the run directory ({err.strerror or err})") from err
        self._check_writable()
        self._check_free_space(min_free_bytes)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def environment_path(self) -> Path:
        return self.path / "environment.json"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    def stage_dir(self, stage: str) -> Path:
        """`checkpoints/<stage>/`, created on demand."""
        if not stage or "/" in stage or "\\" in stage or stage in (".", ".."):
            raise ValueError(f"stage name {stage!r} must be a plain folder name")
        directory = self.checkpoints / stage
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def write_config(self, cfg: "RunConfig") -> Path:
        """Save the resolved config; a different earlier one is kept as `config.previous.yaml`."""
        from cxrdistill.config import dump_config

        tmp = self.path / ".config.yaml.tmp"
        dump_config(cfg, tmp)
        if self.config_path.exists() and self.config_path.read_bytes() != tmp.read_bytes():
            os.replace(self.config_path, self.path / "config.previous.yaml")
        os.replace(tmp, self.config_path)
        return self.config_path

    def write_environment(self) -> Path:
        """Save `environment_info()` as JSON."""
        self.environment_path.write_text(json.dumps(environment_info(), indent=2) + "\n", encoding="utf-8")
        return self.environment_path

    def _check_writable(self) -> None:
        try:
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-"):
                pass
        except OSError as err:
            raise CxrDistillError(
                f"{self.path}: run directory is not writable ({err.strerror or err}); choose another --output-dir"
            ) from err

    def _check_free_space(self, min_free_bytes: int) -> None:
        free = shutil.disk_usage(self.path).free
        if free < min_free_bytes:
            raise CxrDistillError(
                f"{self.path}: only {free / 2**20:.0f} MiB free, need at least {min_free_bytes / 2**20:.0f} MiB "
                f"for checkpoints and logs; free space or choose another --output-dir"
            )


def environment_info() -> dict[str, Any]:
    """Versions that decide a run's numbers; deliberately no host name or user name."""
    import torch

    versions = {}
    for package in ("cxrdistill", "torch", "monai", "lightning-fabric", "numpy", "pydantic", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "packages": versions,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }


def _git_commit() -> str | None:
    """The commit of the source tree this package was imported from, if it is a git checkout."""
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None
