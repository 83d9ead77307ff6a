"""Recipes by name: `@register_method("name", ParamsModel)` on a `run(cfg, params, ctx)` function.

A recipe module in `cxrdistill.methods` registers itself when imported::

    class Params(BaseModel):
        ema_decay: float = 0.999

    @register_method("mean_teacher", Params)
    def run(cfg: RunConfig, params: Params, ctx: RunContext) -> dict[str, float]:
        ...  # returns the final metrics

`get_method(name)` imports the modules of this package lazily (only when the name is not yet
known), so `cxrdistill --help` stays fast and one broken recipe does not hide the others.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from cxrdistill.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from cxrdistill.config import RunConfig
    from cxrdistill.engine.context import RunContext

RunFn = Callable[["RunConfig", Any, "RunContext"], dict[str, float]]


@dataclass(frozen=True)
class MethodSpec:
    """A registered recipe: its name, its parameter model and its `run` function."""

    name: str
    params_cls: type[BaseModel]
    run: RunFn


_REGISTRY: dict[str, MethodSpec] = {}
_IMPORT_FAILURES: dict[str, str] = {}
_scanned = False


def register_method(name: str, params_cls: type[BaseModel]) -> Callable[[RunFn], RunFn]:
    """Decorator: register `run` under `name` with `params_cls` validating `method.params`."""
    if not (isinstance(params_cls, type) and issubclass(params_cls, BaseModel)):
        raise TypeError(f"register_method({name!r}): params_cls must be a pydantic BaseModel class")

    def decorate(run: RunFn) -> RunFn:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.run.__module__ != run.__module__:
            raise ValueError(
                f"method {name!r} is registered twice: in {existing.run.__module__} and {run.__module__}"
            )
        _REGISTRY[name] = MethodSpec(name, params_cls, run)
        return run

    return decorate


def get_method(name: str) -> MethodSpec:
    """The recipe registered as `name`; `ConfigError` with the nearest names when unknown."""
    if name not in _REGISTRY:
        _import_all()
    spec = _REGISTRY.get(name)
    if spec is None:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        msg = f"method.name: unknown method {name!r}{hint} (registered: {', '.join(known) or 'none'})"
        if _IMPORT_FAILURES:
            failed = "; ".join(f"{mod}: {why}" for mod, why in sorted(_IMPORT_FAILURES.items()))
            msg += f". These method modules failed to import: {failed}"
        raise ConfigError(msg)
    return spec


def available_methods() -> list[str]:
    """Names of every recipe in `cxrdistill.methods`, sorted."""
    _import_all()
    return sorted(_REGISTRY)


def validate_method_params(name: str, params: dict[str, Any]) -> BaseModel:
    """`method.params` as the recipe's own model; unknown keys and bad values raise `ConfigError`."""
    from cxrdistill.validation import _suggest, format_validation_error

    spec = get_method(name)
    fields = spec.params_cls.model_fields
    valid = set(fields) | {f.alias for f in fields.values() if f.alias}
    for key in params:
        if key not in valid:
            raise ConfigError(
                f"method.params.{key}: unknown parameter of method {name!r}{_suggest(key, sorted(fields))}"
            )
    try:
        return spec.params_cls.model_validate(params)
    except ValidationError as err:
        raise ConfigError(
            format_validation_error(err, spec.params_cls, f"method {name!r}", prefix="method.params")
        ) from None


def _import_all() -> None:
    """Import every module of `cxrdistill.methods` once; remember the ones that fail."""
    global _scanned
    if _scanned:
        return
    import cxrdistill.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "registry" or info.name.startswith("_"):
            continue
        module = f"{package.__name__}.{info.name}"
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - reported in get_method's error, never dropped
            _IMPORT_FAILURES[module] = f"{type(err).__name__}: {err}"
    for module in _RECIPES_ELSEWHERE:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - as above
            _IMPORT_FAILURES[module] = f"{type(err).__name__}: {err}"
    _scanned = True


_RECIPES_ELSEWHERE = ("cxrdistill.ssl.recipe",)
"""Recipes outside `cxrdistill.methods` (``pretrain``), so `cxrdistill train` and a study cell run them too."""


def load_run_config(path: Path | str | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """`config.load_config` and the recipe's own validation of `method.params` (a typo there fails here)."""
    from cxrdistill.config import load_config

    cfg = load_config(path, overrides)
    validate_method_params(cfg.method.name, cfg.method.params)
    return cfg
