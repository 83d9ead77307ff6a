"""A study: recipe rows × labeled fractions × seeds on one data set, as a YAML file or built in Python.

    name: detection_cpu
    output_dir: runs/studies/detection_cpu
    labeled_fraction: [0.1, 0.2, 0.4]   # written to `fraction_key` of every cell (old name: `fractions`)
    seeds: [0, 1, 2]                    # written to every key of `seed_keys`
    overrides: [train.max_steps=200]    # applied to every cell (before the row's own)
    baseline: supervised                # paired comparisons are against this row
    metrics: [mAP@0.5, mAP@0.25]        # one table per metric (or `metric: mAP@0.5`)
    data: {source: tbx11k, root: ../shared/data/tbx11k-800}   # optional: a prepared data set
    recipes:
      supervised: {config: configs/supervised_detector.yaml}
      stac: {config: configs/stac.yaml, overrides: [method.params.threshold=0.9]}
      sweep:                            # one row per grid point: sweep.threshold=0.5, sweep.threshold=0.7
        config: configs/stac.yaml
        grid: {method.params.threshold: [0.5, 0.7]}
      student:                          # starts from the same fraction/seed cell of row `supervised`
        config: configs/oxnet.yaml
        init_from: supervised

**Rows.** A recipe without `grid` is one row named like the recipe. A recipe with ``grid`` (a mapping
key → values: their product; or a list of mappings: those points) is one row per point, named
``<recipe>.<leaf>=<value>...`` (the leaf is the key's last part) and labelled ``label`` formatted
with the leaves (``"AALS t={t}"``), else ``<label> (leaf=value, ...)``. A study-level ``grid``
multiplies every recipe's rows the same way. The fraction axis is not a grid key: it is
``labeled_fraction`` (``fraction_key``, default ``data.boxed_fraction``: the patients that keep their
annotations: boxes for detection, image labels for classification recipes).

**Cells.** Each cell is a normal run directory ``output_dir/<row>/f<fraction>/seed<seed>`` whose
config is the row's base config plus, in this order, ``data.manifest=<prepared>`` (with ``data``),
the study's `overrides`, the recipe's `overrides`, the grid point's ``key=value``, the command
line's overrides, ``<fraction_key>=<fraction>``, ``<seed key>=<seed>`` and, for a row with ``init_from``,
``init_from=<that row's cell at the same fraction and seed>`` (the run whose supervised stage this
cell starts from, see `methods.kit.supervised_stage`; it runs first). Relative config paths are
read from the working directory, else next to the study file.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cxrdistill.errors import ConfigError

Grid = dict[str, list[Any]] | list[dict[str, Any]]


class RecipeEntry(BaseModel):
    """One recipe of the study: a run config, the overrides that make it this recipe, and
    optionally a grid (several rows) or the row whose supervised stage it starts from."""

    model_config = ConfigDict(extra="forbid")

    config: Path
    overrides: list[str] = Field(default_factory=list)
    label: str | None = None
    """Name shown in the table (default: the recipe's key); with a grid, may hold ``{leaf}`` fields."""
    grid: Grid | None = None
    """Rows of this recipe: a mapping ``key: [values]`` (their product) or a list of ``{key: value}`` points."""
    init_from: str | None = None
    """A row (or a recipe; with grids: the row whose point agrees with this one) whose cell at the same
    fraction and seed this recipe's cells start from (``init_from=<run dir>`` in their config)."""
    init_as: Literal["stage", "backbone"] = "stage"
    """What `init_from` hands on: ``stage``, the source's supervised stage (``init_from=<run dir>``);
    ``backbone``, its backbone weights (``model.pretrained=<run dir>``: a `cxrdistill pretrain` cell)."""
    labeled_fraction: list[float] | None = None
    """The fractions this recipe runs at (a subset of the study's; default: all). A row whose result
    does not depend on the labels (a self-supervised pretraining) runs at one fraction, and a row
    that starts from it takes that cell at every fraction."""
    table: bool = True
    """Whether the recipe's rows appear in the tables (``false`` for a pretraining cell whose own
    metrics are not the study's)."""
    compare_to: str | None = None
    """A row (or a recipe, resolved as for `init_from`) this recipe's rows are also compared with,
    paired over the same test images at each fraction and seed, besides the baseline: e.g. the same
    recipe without self-supervised pretraining, or a compute-matched control."""


class DataSource(BaseModel):
    """A public data set prepared once per study: ``source`` names a `data.sources` adapter."""

    model_config = ConfigDict(extra="forbid")

    source: str
    root: Path
    """The data set's folder (relative: to the working directory, else to the study file)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword options of the adapter."""
    on_error: Literal["strict", "lenient"] = "strict"


@dataclass(frozen=True)
class Row:
    """One row of the table: a recipe at one grid point."""

    name: str
    recipe: str
    label: str
    overrides: tuple[str, ...]
    """The recipe's overrides, then the grid point's ``key=value``."""
    point: tuple[tuple[str, Any], ...] = ()
    init_from: str | None = None
    """The row whose cells this row's cells start from."""
    init_as: Literal["stage", "backbone"] = "stage"
    """``stage``: ``init_from=<source cell>``; ``backbone``: ``model.pretrained=<source cell>``."""
    fractions: tuple[float, ...] | None = None
    """The fractions this row runs at (None: every fraction of the study)."""
    in_table: bool = True
    compare_to: str | None = None
    """The row this row is also compared with (paired), besides the baseline."""


class StudySpec(BaseModel):
    """What `cxrdistill compare --study X.yaml` and `run_study` read."""

    model_config = ConfigDict(extra="forbid")

    name: str
    output_dir: Path
    recipes: dict[str, RecipeEntry]
    fractions: list[float] = Field(min_length=1)
    """The labeled fractions (written ``labeled_fraction`` in a study file; ``fractions`` still reads)."""
    axis: str | None = None
    """Name of the fraction axis in tables (``labeled_fraction`` when the file says so; default:
    the last part of `fraction_key`, as studies written before `labeled_fraction` showed it)."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    overrides: list[str] = Field(default_factory=list)
    command_line: list[str] = Field(default_factory=list)
    """Overrides given on the command line (``cxrdistill compare --study X key=value``): applied to
    every cell after the recipe's own and the grid point's, so they win over both."""
    fraction_key: str = "data.boxed_fraction"
    seed_keys: list[str] = Field(default_factory=lambda: ["train.seed", "data.split_seed"])
    """Every seed sets these keys: by default a seed draws both the labeled subset and the initialisation."""
    grid: Grid | None = None
    """Multiplies every recipe's rows (see the module docstring)."""
    data: DataSource | None = None
    baseline: str | None = None
    """Row the others are compared with (default: the first row)."""
    metric: str = "mAP@0.5"
    """Headline metric: a key of final_metrics.json. ``mAP``/``mAP@<iou>`` pairs on predictions.json,
    ``macro_AUROC`` on image_scores.json."""
    metrics: list[str] = Field(default_factory=list)
    """Every metric that gets its own table (the first is the headline; default: ``[metric]``)."""
    ci: Literal["t", "bootstrap"] = "t"
    """Interval over seeds: Student-t (mean ± t·s/√n) or a percentile bootstrap of the seed mean."""
    n_boot: int = Field(1000, ge=10)
    """Replicates of the paired bootstrap over test images (and of the seed bootstrap)."""
    source: Path | None = Field(None, exclude=True)
    """The YAML file this spec was read from (relative config paths may be relative to it)."""

    @model_validator(mode="before")
    @classmethod
    def _labeled_fraction(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "labeled_fraction" in raw:
            if "fractions" in raw:
                raise ValueError("give labeled_fraction or fractions (its old name), not both")
            raw = {**raw, "fractions": raw["labeled_fraction"], "axis": raw.get("axis") or "labeled_fraction"}
            raw.pop("labeled_fraction")
        if isinstance(raw, dict) and raw.get("metrics") and "metric" not in raw:
            raw = {**raw, "metric": raw["metrics"][0]}
        return raw

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        if not self.recipes:
            raise ValueError("recipes: give at least one recipe")
        if len(set(self.fractions)) != len(self.fractions) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("fractions and seeds must not repeat")
        for name in self.recipes:
            if not name or "/" in name or name.startswith(".") or "." in name:
                raise ValueError(f"recipe name {name!r} must be a plain folder name (no '/' or '.')")
        if not self.metrics:
            self.metrics = [self.metric]
        elif self.metric not in self.metrics:
            self.metrics = [self.metric, *self.metrics]
        rows = _expand_rows(self)  # raises ValueError on a bad grid or init_from
        for row in rows.values():
            extra = sorted(set(row.fractions or ()) - set(self.fractions))
            if extra:
                raise ValueError(f"recipes.{row.recipe}.labeled_fraction: {extra} not in the study's {self.fractions}")
            if row.init_from is not None:
                for fraction in self.row_fractions(row.name, rows):
                    self.source_fraction(row.name, fraction, rows)  # raises when there is none
        tabled = [name for name, row in rows.items() if row.in_table]
        if not tabled:
            raise ValueError("recipes: every recipe has table: false; keep at least one row in the table")
        for row in rows.values():
            if row.compare_to is not None and row.compare_to not in tabled:
                raise ValueError(f"recipes.{row.recipe}.compare_to: {row.compare_to!r} is not one of the table's rows")
            if row.compare_to is not None and set(self.row_fractions(row.name, rows)) - set(
                    self.row_fractions(row.compare_to, rows)):
                raise ValueError(f"recipes.{row.recipe}.compare_to: {row.compare_to!r} does not run at every "
                                 f"fraction of {row.name!r}")
        if self.baseline is not None and self.baseline not in tabled:
            raise ValueError(f"baseline {self.baseline!r} is not one of the table's rows ({', '.join(tabled)})")
        return self

    @property
    def rows(self) -> dict[str, Row]:
        """The table's rows by name, in file order (a recipe's grid points in order)."""
        return _expand_rows(self)

    @property
    def table_rows(self) -> dict[str, Row]:
        """The rows the tables and the report show (those of recipes without ``table: false``)."""
        return {name: row for name, row in self.rows.items() if row.in_table}

    @property
    def baseline_name(self) -> str:
        return self.baseline or next(iter(self.table_rows))

    def row_fractions(self, row: str, rows: dict[str, Row] | None = None) -> list[float]:
        """The fractions the row runs at, in the study's order."""
        own = (rows or self.rows)[row].fractions
        return [f for f in self.fractions if own is None or f in own]

    def source_fraction(self, row: str, fraction: float, rows: dict[str, Row] | None = None) -> float:
        """The fraction of the `init_from` cell that `row`'s cell at `fraction` starts from: the same
        fraction where the source runs at it, else the source's only fraction."""
        rows = rows or self.rows
        source = rows[row].init_from
        assert source is not None
        theirs = self.row_fractions(source, rows)
        if fraction in theirs:
            return fraction
        if len(theirs) == 1:
            return theirs[0]
        raise ValueError(f"recipes.{rows[row].recipe}: its init_from row {source!r} does not run at fraction "
                         f"{fraction:g} (it runs at {theirs}); give it that fraction or exactly one")

    @property
    def axis_name(self) -> str:
        """How tables name the fraction axis."""
        return self.axis or self.fraction_key.split(".")[-1]

    def label(self, row: str) -> str:
        return self.rows[row].label

    def config_path(self, row: str) -> Path:
        """The row's base config: as written, from the working directory, else next to the study file."""
        path = self.recipes[self.rows[row].recipe].config
        if path.is_absolute() or path.exists() or self.source is None:
            return path
        beside = self.source.parent / path
        return beside if beside.exists() else path

    def data_root(self) -> Path | None:
        """The data source's folder, resolved like config paths."""
        if self.data is None:
            return None
        root = self.data.root
        if root.is_absolute() or root.exists() or self.source is None:
            return root
        beside = self.source.parent / root
        return beside if beside.exists() else root


def _points(grid: Grid | None, where: str) -> list[tuple[tuple[str, Any], ...]]:
    """The grid's points as ``((key, value), ...)`` tuples (one empty point without a grid)."""
    if grid is None:
        return [()]
    if isinstance(grid, dict):
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}grid.{key}: give a non-empty list of values")
        keys = list(grid)
        points = [tuple(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    else:
        if not grid:
            raise ValueError(f"{where}grid: give at least one point")
        points = [tuple(point.items()) for point in grid]
    for point in points:
        for key, value in point:
            if "=" in key or not key.strip():
                raise ValueError(f"{where}grid: {key!r} is not a config key")
            if isinstance(value, (dict, list)) or "/" in _text(value):
                raise ValueError(f"{where}grid.{key}: {value!r} must be a plain value (it names a folder)")
    return points


def _text(value: Any) -> str:
    """A grid value as written in a folder name and an override (YAML/JSON scalars)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value)


def _expand_rows(spec: StudySpec) -> dict[str, Row]:
    study_points = _points(spec.grid, "")
    rows: dict[str, Row] = {}
    for recipe, entry in spec.recipes.items():
        for recipe_point in _points(entry.grid, f"recipes.{recipe}."):
            for study_point in study_points:
                point = recipe_point + study_point
                keys = [k for k, _ in point]
                if len(set(keys)) != len(keys):
                    raise ValueError(f"recipes.{recipe}: grid key repeated by the study grid ({keys})")
                if spec.fraction_key in keys:
                    raise ValueError(f"grid: {spec.fraction_key} is the fraction axis: use labeled_fraction")
                leaves = {k.split(".")[-1]: v for k, v in point}
                if len(leaves) != len(point):
                    raise ValueError(f"recipes.{recipe}: two grid keys end in the same name ({keys})")
                name = ".".join([recipe, *(f"{leaf}={_text(v)}" for leaf, v in leaves.items())])
                label = entry.label or recipe
                if point:
                    if "{" in label:
                        try:
                            label = label.format(**{k: _text(v) for k, v in leaves.items()})
                        except (KeyError, IndexError, ValueError) as err:
                            raise ValueError(f"recipes.{recipe}.label: {label!r} does not format ({err})") from None
                    else:
                        label = f"{label} ({', '.join(f'{k}={_text(v)}' for k, v in leaves.items())})"
                overrides = (*entry.overrides, *(f"{k}={_text(v)}" for k, v in point))
                if name in rows:
                    raise ValueError(f"recipes.{recipe}: row {name!r} appears twice")
                fractions = tuple(entry.labeled_fraction) if entry.labeled_fraction is not None else None
                rows[name] = Row(name, recipe, label, overrides, point, entry.init_from, entry.init_as,
                                 fractions, entry.table, entry.compare_to)
    resolved = {}
    for name, row in rows.items():
        if row.init_from is not None:
            row = replace(row, init_from=_named_row(row, rows, row.init_from, "init_from"))
        if row.compare_to is not None:
            row = replace(row, compare_to=_named_row(row, rows, row.compare_to, "compare_to"))
        resolved[name] = row
    for name in resolved:  # no cycle: following init_from ends at a row without one
        seen, at = {name}, resolved[name].init_from
        while at is not None:
            if at in seen:
                raise ValueError(f"recipes: init_from makes a cycle through {at!r}")
            seen.add(at)
            at = resolved[at].init_from
    return resolved


def _named_row(row: Row, rows: dict[str, Row], target: str, field: str) -> str:
    """The row ``target`` (``row``'s `init_from` or `compare_to`) names: a row, or the row of that
    recipe whose point agrees with ``row``'s."""
    if target in rows and target != row.name:
        return target
    mine = dict(row.point)
    candidates = [r.name for r in rows.values() if r.recipe == target and r.name != row.name
                  and all(k in mine and mine[k] == v for k, v in r.point)]
    if len(candidates) != 1:
        raise ValueError(f"recipes.{row.recipe}.{field}: {target!r} names "
                         + ("no row" if not candidates else f"{len(candidates)} rows ({', '.join(candidates)})")
                         + f" for row {row.name!r}; name a row or a recipe whose grid keys this row shares")
    return candidates[0]


def load_study(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> StudySpec:
    """Read and validate a study YAML; `overrides` (``key=value``, the command line's) apply to every
    cell after the study's and the recipe's own (`StudySpec.command_line`)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read study ({err.strerror or err})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study must be a mapping")
    raw["command_line"] = list(raw.get("command_line") or []) + list(overrides)
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
    """One run of the study: a row (``recipe``: the row's name) at a labeled fraction and a seed."""

    recipe: str
    fraction: float
    seed: int
    config: Path
    overrides: tuple[str, ...]
    run_dir: Path
    after: Path | None = None
    """The run directory this cell starts from (its row's ``init_from``): it must be finished first."""

    @property
    def done(self) -> bool:
        return (self.run_dir / "final_metrics.json").is_file()

    def train_args(self) -> list[str]:
        """Arguments of ``cxrdistill train`` that run this cell."""
        return ["train", "--config", str(self.config), *self.overrides, "--output-dir", str(self.run_dir)]


def fraction_tag(fraction: float) -> str:
    """Folder name of a fraction: ``f0.1``, ``f0.25``, ``f1``."""
    return f"f{fraction:g}"


__all__ = ["Cell", "DataSource", "RecipeEntry", "Row", "StudySpec", "fraction_tag", "load_study", "make_study"]
