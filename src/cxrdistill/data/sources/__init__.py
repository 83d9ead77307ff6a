"""One adapter per public dataset, all with the same signature.

`get_source(name)(root, *, on_error="strict"|"lenient", **options) -> dict` returns the raw
manifest dict (`categories`, `images` with `file_name`s relative to `root`, `annotations`,
`info`, and `skipped`: the `"file:line: problem"` strings of the rows left out in lenient mode).
Validate it with `cxrdistill.data.manifest.manifest_from_dict(raw, root=root, ...)`.
Each adapter's module docstring documents the files it reads and the choices it makes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

#: source name -> module (in this package) whose `load` reads it
_MODULES = {
    "nih": "nih",
    "mimic": "mimic",
    "vindr": "vindr",
    "chexpert": "chexpert",
    "rsna": "rsna",
    "tbx11k": "tbx11k",
    "coco": "coco",
    "csv": "csv_table",
}
SOURCES: tuple[str, ...] = tuple(_MODULES)

Source = Callable[..., dict[str, Any]]


def get_source(name: str) -> Source:
    """The adapter `load(root, *, on_error, **options) -> dict` of dataset `name`."""
    if name not in _MODULES:
        raise ValueError(f"unknown source {name!r}; choose one of {list(SOURCES)}")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return module.load
