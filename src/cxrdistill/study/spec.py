"""A study: recipes × labeled fractions × seeds on one data set, as a YAML file or built in Python.

    name: detection_cpu
    output_dir: runs/studies/detection_cpu
    fractions: [0.1, 0.2, 0.4]          # written to `fraction_key` of every cell
    seeds: [0, 1, 2]                    # written to every key of `seed_keys`
    overrides: [train.max_steps=200]    # applied to every cell (before the recipe's own)
    baseline: supervised                # paired comparisons are against this recipe
    metric: mAP@0.5                     # a key of each cell's final_metrics.json
    recipes:
      supervised: {config: configs/supervised_detector.yaml}
      stac: {config: configs/stac.yaml, overrides: [method.params.threshold=0.9]}

Each cell is a normal run directory ``output_dir/<recipe>/f<fraction>/seed<seed>`` whose config is
the recipe's base config plus, in this order, the study's `overrides`, the recipe's `overrides`,
``<fraction_key>=<fraction>`` and ``<seed key>=<seed>``. Relative config paths are read from the
working directory, else next to the study file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cxrdistill.errors import ConfigError


class RecipeEntry(BaseModel):
    """One row of the study: a run config and the overrides that make it this recipe."""

    model_config = ConfigDict(extra="forbid")

    config: Path
    overrides: list[str] = Field(default_factory=list)
    label: str | None = None
    """Name shown in the table (default: the recipe's key)."""


class StudySpec(BaseModel):
    """What `cxrdistill compare --study X.yaml` and `run_study` read."""

    model_config = ConfigDict(extra="forbid")

    name: str
    output_dir: Path
    recipes: dict[str, RecipeEntry]
    fractions: list[float] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    overrides: list[str] = Field(default_factory=list)
    fraction_key: str = "data.boxed_fraction"
    seed_keys: list[str] = Field(default_factory=lambda: ["train.seed", "data.split_seed"])
    """Every seed sets these keys: by default a seed draws both the labeled subset and the initialisation."""
    baseline: str | None = None
    """Recipe the others are compared with (default: the first recipe)."""
    metric: str = "mAP@0.5"
    """Headline metric: a key of final_metrics.json. ``mAP``/``mAP@<iou>`` pairs on predictions.json,
    ``macro_AUROC`` on image_scores.json."""
    ci: Literal["t", "bootstrap"] = "t"
    """Interval over seeds: Student-t (mean ± t·s/√n) or a percentile bootstrap of the seed mean."""
    n_boot: int = Field(1000, ge=10)
    """Replicates of the paired bootstrap over test images (and of the seed bootstrap)."""
    source: Path | None = Field(None, exclude=True)
    """The YAML file this spec was read from (relative config paths may be relative to it)."""

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        if not self.recipes:
            raise ValueError("recipes: give at least one recipe")
        if self.baseline is not None and self.baseline not in self.recipes:
            raise ValueError(f"baseline {self.baseline!r} is not one of the recipes ({', '.join(self.recipes)})")
        if len(set(self.fractions)) != len(self.fractions) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("fractions and seeds must not repeat")
        for name in self.recipes:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"recipe name {name!r} must be a plain folder name")
        return self

    @property
    def baseline_name(self) -> str:
        return self.baseline or next(iter(self.recipes))

    def label(self, recipe: str) -> str:
        return self.recipes[recipe].label or recipe

    def config_path(self, recipe: str) -> Path:
        """The recipe's base config: as written, from the working directory, else next to the study file."""
        path = self.recipes[recipe].config
        if path.is_absolute() or path.exists() or self.source is None:
            return path
        beside = self.source.parent / path
        return beside if beside.exists() else path


def load_study(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> StudySpec:
    """Read and validate a study YAML; `overrides` (``key=value``) are added to the study's own overrides."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read study ({err.strerror or err})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study must be a mapping")
    raw["overrides"] = list(raw.get("overrides") or []) + list(overrides)
    spec = make_study(raw, source=str(path))
    spec.source = path
    return spec


def make_study(raw: dict, source: str = "study") -> StudySpec:
    """Validate a plain dict as a `StudySpec` (the Python way to build one); `ConfigError` on bad input."""
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as err:
        lines = [f"{'.'.join(map(str, e['loc'])) or '(study)'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{source}: invalid study:\n  " + "\n  ".join(lines)) from None




@dataclass(frozen=True)
class Cell:
    """One run of the study: a recipe at a labeled fraction and a seed."""

    recipe: str
    fraction: float
    seed: int
    config: Path
    overrides: tuple[str, ...]
    run_dir: Path

    @property
    def done(self) -> bool:
        return (self.run_dir / "final_metrics.json").is_file()

    def train_args(self) -> list[str]:
        """Arguments of ``cxrdistill train`` that run this cell."""
        return ["train", "--config", str(self.config), *self.overrides, "--output-dir", str(self.run_dir)]


def fraction_tag(fraction: float) -> str:
    """Folder name of a fraction: ``f0.1``, ``f0.25``, ``f1``."""
    return f"f{fraction:g}"


__all__ = ["Cell", "RecipeEntry", "StudySpec", "fraction_tag", "load_study", "make_study"]
