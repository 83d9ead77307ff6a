"""Readable pydantic validation errors: one line per bad key, unknown keys with a suggestion,
wrong types with the expected type and the value given. Used by the run config and by recipes'
`method.params` (a low module: it imports nothing of the package)."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str, prefix: str = "") -> str:
    """One line per bad key: unknown keys with a suggestion, wrong types with expected type and value."""
    lines: dict[str, str] = {}
    for item in err.errors():
        owner, field_path, rest = _walk(model, item["loc"])
        key = ".".join(str(p) for p in (*([prefix] if prefix else []), *field_path))
        if not key:  # e.g. a non-string key at the top level
            key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            name = str(field_path[-1]) if field_path else str(rest[0] if rest else "?")
            if owner is None:
                continue
            lines.setdefault(key, f"{key}: unknown key{_suggest(name, list(owner.model_fields))}")
        elif item["type"] == "missing":
            lines.setdefault(key, f"{key}: required key is missing")
        else:
            expected = _describe(_field_annotation(model, field_path))
            value = item.get("input")
            lines.setdefault(
                key,
                f"{key}: expected {expected}, got {value!r} ({type(value).__name__}): {item['msg']}",
            )
    body = "\n  ".join(lines.values())
    return f"{source}: invalid run config:\n  {body}"


def _leaf_types(annotation: Any) -> set[Any]:
    """The plain types in an annotation: `int | None` -> {int, NoneType}; containers are left out."""
    if typing.get_origin(annotation) is Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return set().union(*(_leaf_types(a) for a in typing.get_args(annotation)))
    return {annotation} if isinstance(annotation, type) else set()


#: Names from other toolkits that spelling similarity does not find.
_ALIASES = {"learning_rate": "lr", "steps": "max_steps", "num_steps": "max_steps", "wd": "weight_decay",
            "clip_grad": "grad_clip", "gradient_clip_val": "grad_clip", "workers": "num_workers"}


def _suggest(name: str, valid: list[str]) -> str:
    close = [_ALIASES[name]] if _ALIASES.get(name) in valid else \
        difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (valid keys: {', '.join(valid)})"


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, list[Any], list[Any]]:
    """Follow `loc` through nested models: (model owning the last field, field path, leftover loc)."""
    current: type[BaseModel] | None = model
    owner: type[BaseModel] | None = model
    path: list[Any] = []
    for index, part in enumerate(loc):
        if current is None or not isinstance(part, str):
            return owner, path, list(loc[index:])
        owner = current
        path.append(part)
        field = current.model_fields.get(part)
        if field is None:  # an unknown key: `owner` is where it was written
            return owner, path, list(loc[index + 1 :])
        current = _model_in(field.annotation)
    return owner, path, []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _field_annotation(model: type[BaseModel], path: list[Any]) -> Any:
    current: Any = model
    annotation: Any = None
    for part in path:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return annotation
        field = current.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        current = annotation
    return annotation


def _describe(annotation: Any) -> str:
    """A short human name for a type annotation: `int`, `one of 'a', 'b'`, `float or None`."""
    if annotation is None:
        return "a valid value"
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _describe(typing.get_args(annotation)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_describe(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


__all__ = ["format_validation_error", "suggest"]

suggest = _suggest
