"""The run directory: one folder holding everything a run produces.

```
<output_dir>/
  config.yaml        the resolved config (every default filled in)
  run.json           the run's fingerprint: the config keys that decide its results + manifest sha256
  environment.json   python / torch / monai / ... versions, git commit (no host names)
  metrics.csv        one row per logged step: step, stage, loss terms, eval metrics, counts
  logs/              TensorBoard event files, text logs
  checkpoints/<stage>/last.pt, best.pt, done.json
  eval/              predictions and evaluation outputs
```

The directory is checked up front for write access and free space, so a full disk fails in the
first second rather than at the first checkpoint hours later.

A folder knows what it holds (`run.json`): `check_run(cfg, resume=True)` refuses to continue a run
made with a different config (or manifest content), listing the differing keys, and
`check_run(cfg, resume=False)` moves an earlier run aside (`<name>.old-<n>/`) before starting over,
so finished stages are only ever reused by the config that made them.
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

from cxrdistill.atomic import write_json_atomic
from cxrdistill.data.manifest import manifest_records_sha256
from cxrdistill.errors import CxrDistillError

if TYPE_CHECKING:
    from cxrdistill.config import RunConfig

DEFAULT_MIN_FREE_BYTES = 1 << 30  # 1 GiB

# Keys that do not change a run's numbers: where it is written, whether it resumes, how it shows
# progress, where the image cache lives. `data.manifest` is compared by its records (sha256,
# `data.manifest.manifest_records_sha256`), not by its path or where it says the images are.
VOLATILE_KEYS = frozenset({"output_dir", "train.resume", "train.progress", "train.tensorboard",
                           "data.cache_dir", "data.manifest"})
MANIFEST_KEY = "data.manifest (sha256 of its records)"
# Runs made before 3 Dec 2026 recorded the sha256 of the whole file, `info.image_root` included,
# which changes with where the checkout is (`upgrade_fingerprint`).
LEGACY_MANIFEST_KEY = "data.manifest (sha256 of its content)"


class RunMismatchError(CxrDistillError):
    """The run folder holds a run made with a different config; the message lists the keys."""


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
    def fingerprint_path(self) -> Path:
        return self.path / "run.json"

    def holds_run(self) -> bool:
        """True when an earlier `train` wrote its config here."""
        return self.fingerprint_path.is_file() or self.config_path.is_file()

    def check_run(self, cfg: RunConfig, *, resume: bool, move: bool = True) -> Path | None:
        """Make sure this folder may hold the run of `cfg`, before any stage is resumed or reused.

        resume=True: an earlier run with a different fingerprint raises `RunMismatchError` listing
        each differing key (old → new) and offering --no-resume. resume=False: an earlier run is
        renamed to `<name>.old-<n>` (when `move`; other DDP ranks pass False) and the folder starts
        empty; returns where it went. Writes `run.json` for the new run.
        """
        new = run_fingerprint(cfg)
        moved: Path | None = None
        if self.holds_run():
            old = upgrade_fingerprint(self._saved_fingerprint(), cfg.data.manifest)
            if resume:
                diff = fingerprint_diff(old, new)
                if diff:
                    lines = "; ".join(f"{key}: {short_value(a)} -> {short_value(b)}" for key, a, b in diff)
                    raise RunMismatchError(
                        f"{self.path}: holds a run made with a different config ({len(diff)} key(s) differ: "
                        f"{lines}). Its finished stages would be reused for the new settings. Rerun with "
                        f"--no-resume to start over (the old run is moved to {self.path.name}.old-<n>/), or "
                        f"choose another --output-dir."
                    )
            elif move:
                moved = self.move_aside()
        if move:
            write_json_atomic(self.fingerprint_path, new, sort_keys=True)
        return moved

    def _saved_fingerprint(self) -> dict[str, Any]:
        if self.fingerprint_path.is_file():
            try:
                return dict(json.loads(self.fingerprint_path.read_text(encoding="utf-8")))
            except (ValueError, OSError, TypeError) as err:
                raise RunMismatchError(f"{self.fingerprint_path}: unreadable ({err}); rerun with --no-resume") from err
        import yaml  # a run from before run.json: compare its config.yaml (manifest by path only)

        try:
            raw = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, OSError) as err:
            raise RunMismatchError(f"{self.config_path}: unreadable ({err}); rerun with --no-resume") from err
        flat = flatten(raw) if isinstance(raw, dict) else {}
        out = {k: v for k, v in flat.items() if k not in VOLATILE_KEYS}
        out[MANIFEST_KEY] = "unknown (run made before run.json)"
        return out

    def move_aside(self) -> Path:
        """Rename the folder to ``<name>.old-<n>`` (the first free n), recreate it empty; returns the new name."""
        n = 1
        while (target := self.path.with_name(f"{self.path.name}.old-{n}")).exists():
            n += 1
        try:
            os.rename(self.path, target)
            for sub in (self.path, self.logs, self.checkpoints, self.eval):
                sub.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CxrDistillError(
                f"{self.path}: cannot move the earlier run aside to {target} ({err.strerror or err}); "
                f"move or delete it yourself, or choose another --output-dir"
            ) from err
        return target

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

    def write_config(self, cfg: RunConfig) -> Path:
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
        write_json_atomic(self.environment_path, environment_info(), indent=2)
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


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": 1}` (lists are values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def run_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The config keys that decide a run's results (flat, JSON values) plus the manifest's sha256."""
    flat = {k: v for k, v in flatten(cfg.model_dump(mode="json")).items() if k not in VOLATILE_KEYS}
    manifest = cfg.data.manifest
    flat[MANIFEST_KEY] = manifest_records_sha256(manifest) if manifest is not None and Path(manifest).is_file() \
        else str(manifest)
    return flat


def upgrade_fingerprint(old: dict[str, Any], manifest: str | Path | None) -> dict[str, Any]:
    """A saved fingerprint in today's terms: an older run's whole-file manifest sha256
    (`LEGACY_MANIFEST_KEY`) becomes the records' sha256 when it is the sha256 of the file now at
    `manifest`, or of that file with only `info.image_root` pointing to the same folder from
    another depth (`../` × k + the same tail: the checkout was elsewhere); otherwise it is kept,
    under `MANIFEST_KEY` and marked, so the difference is listed."""
    if LEGACY_MANIFEST_KEY not in old or MANIFEST_KEY in old:
        return old
    out = {k: v for k, v in old.items() if k != LEGACY_MANIFEST_KEY}
    legacy = old[LEGACY_MANIFEST_KEY]
    path = Path(manifest) if manifest is not None else None
    if path is not None and path.is_file() and legacy in _whole_file_sha256s(path):
        out[MANIFEST_KEY] = manifest_records_sha256(path)
    else:
        out[MANIFEST_KEY] = f"whole-file sha256 (recorded before 3 Dec 2026) {legacy}"
    return out


def _whole_file_sha256s(path: Path, max_depth: int = 12) -> set[str]:
    """sha256 of the manifest's bytes, and of the same bytes with its relative ``info.image_root``
    (``../`` × k + tail) written from each depth k ≤ `max_depth` (`Manifest.save` writes it so)."""
    import hashlib

    data = path.read_bytes()
    out = {hashlib.sha256(data).hexdigest()}
    try:
        declared = json.loads(data).get("info", {}).get("image_root")
    except (ValueError, AttributeError):
        return out
    if not isinstance(declared, str) or os.path.isabs(declared):
        return out
    tail = declared
    while tail.startswith("../"):
        tail = tail[3:]
    written = json.dumps(declared).encode()
    if data.count(written) != 1:
        return out
    for depth in range(max_depth + 1):
        other = json.dumps("../" * depth + tail).encode()
        out.add(hashlib.sha256(data.replace(written, other)).hexdigest())
    return out


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """`(key, old, new)` for every key whose value differs (a missing key reads as `<unset>`)."""
    unset = "<unset>"
    diff = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, unset), new.get(key, unset)
        if key == MANIFEST_KEY and str(a).startswith("unknown"):
            continue  # a run from before run.json: its manifest content is not known
        if a != b:
            diff.append((key, a, b))
    return diff


def short_value(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def environment_info() -> dict[str, Any]:
    """Versions that decide a run's numbers; deliberately no host name or user name."""
    import torch

    versions: dict[str, str | None] = {}
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
