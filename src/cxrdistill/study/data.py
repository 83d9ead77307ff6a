"""A study's data source: a public data set turned into one manifest, once per study folder.

    data: {source: tbx11k, root: /work/shared/data/tbx11k-800}

`prepare_data` reads the folder with the `data.sources` adapter of that name and writes
``<study dir>/data/<source>.json`` (the images stay where they are: the manifest records their
folder as ``info.image_root``) and ``<study dir>/data/<source>.source.json`` (what it was built
from). Every cell then gets ``data.manifest=<that file>`` before the study's own overrides, so the
labeled-fraction re-split (``data.boxed_fraction``) and the seeds work as on the synthetic world.
A prepared manifest is never rebuilt silently: when the study's ``data`` changes, the old one must
be deleted first (finished cells were trained on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from cxrdistill.atomic import write_json_atomic
from cxrdistill.errors import ConfigError
from cxrdistill.study.spec import StudySpec


def prepared_manifest(spec: StudySpec, root: Path) -> Path | None:
    """Where the study's prepared manifest is (or will be); None without a ``data`` source."""
    if spec.data is None:
        return None
    return (Path(root) / "data" / f"{spec.data.source}.json").resolve()


def _description(spec: StudySpec) -> dict[str, Any]:
    assert spec.data is not None
    return {"source": spec.data.source, "root": str(Path(spec.data_root() or spec.data.root).resolve()),
            "options": spec.data.options, "on_error": spec.data.on_error}


def prepare_data(spec: StudySpec, root: Path, console: Console | None = None) -> Path | None:
    """Build the study's manifest from its data source unless it exists; returns its path (None
    without a source). `ConfigError` when the folder does not read, or the existing manifest was
    built from another source."""
    path = prepared_manifest(spec, root)
    if path is None or spec.data is None:
        return None
    described = _description(spec)
    record = path.with_name(f"{spec.data.source}.source.json")
    if path.is_file():
        import json

        before = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
        if before != described:
            raise ConfigError(f"{path}: prepared from {before}, but the study's data is now {described}; "
                              "delete the file (and the cells trained on it) to prepare it again")
        return path
    from cxrdistill.data.manifest import manifest_from_dict
    from cxrdistill.data.sources import get_source

    folder = Path(described["root"])
    if not folder.is_dir():
        raise ConfigError(f"data.root: {folder} is not a folder (study {spec.name!r}, source {spec.data.source!r})")
    try:
        raw = get_source(spec.data.source)(folder, on_error=spec.data.on_error, **spec.data.options)
    except ValueError as err:
        raise ConfigError(f"data.source: {err}") from None
    manifest = manifest_from_dict(raw, root=folder, on_error=spec.data.on_error,
                                  source=f"{spec.data.source}:{folder}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, described)
    manifest.save(path)  # last: its presence marks the preparation complete
    if console is not None:
        console.print(f"data: {len(manifest.images)} images of {spec.data.source} ({folder}) → {path}",
                      highlight=False)
    return path


__all__ = ["prepare_data", "prepared_manifest"]
