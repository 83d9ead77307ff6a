"""Finished cells are reused only by the settings that made them.

A study cell is finished when its run folder holds ``final_metrics.json``. Before a study reuses it
(skips it, builds a table with it, restores it from an archive), its ``run.json`` fingerprint is
compared with the config the study now gives the cell (`cell_config`: the same resolution as
`run.run_training`). A difference stops the study with the cell and the keys named
(`check_finished`), or — ``rerun_changed`` — moves the old run aside so the cell runs again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rich.console import Console

from cxrdistill.errors import CxrDistillError
from cxrdistill.study.spec import Cell

if TYPE_CHECKING:
    from cxrdistill.config import RunConfig


def cell_config(cell: Cell) -> RunConfig:
    """The config the cell's run gets if started now: the same resolution as `run.run_training`
    (split policy, data source)."""
    from cxrdistill.config import load_config
    from cxrdistill.data.split_policy import apply_split_policy
    from cxrdistill.data.study import resolve_data_config

    cfg = load_config(cell.config, list(cell.overrides))
    apply_split_policy(cfg.data, cell.config, list(cell.overrides))
    cfg.output_dir = cell.run_dir
    resolve_data_config(cfg.data)
    return cfg


def cell_fingerprint(cell: Cell) -> dict[str, Any]:
    """The fingerprint (`engine.run_dir.run_fingerprint`) the cell's run would have if started now."""
    from cxrdistill.engine.run_dir import run_fingerprint

    return run_fingerprint(cell_config(cell))


def changed_cells(cells: list[Cell]) -> dict[Cell, list[tuple[str, Any, Any]]]:
    """Finished cells whose saved ``run.json`` differs from the config the study gives them now, with
    the differing ``(key, old, new)``. Not a difference: a key the old run did not record (a setting
    added to the code after it ran), and a path to the same cell of the study in another study folder
    (an ``init_from`` of a study restored elsewhere, `study.archive`). A run without ``run.json``
    cannot be checked and is kept."""
    from cxrdistill.engine.run_dir import fingerprint_diff, run_fingerprint, upgrade_fingerprint

    out: dict[Cell, list[tuple[str, Any, Any]]] = {}
    for cell in cells:
        saved = cell.run_dir / "run.json"
        if not cell.done or not saved.is_file():
            continue
        config = cell_config(cell)
        old = upgrade_fingerprint(cast(dict[str, Any], json.loads(saved.read_text(encoding="utf-8"))),
                                  config.data.manifest)
        root = cell.run_dir.parents[2]  # <root>/<row>/<fraction>/seed<k>
        diff = [(k, a, b) for k, a, b in fingerprint_diff(old, run_fingerprint(config))
                if k in old and not _same_cell_elsewhere(a, b, root)]
        if diff:
            out[cell] = diff
    return out


def _same_cell_elsewhere(old: Any, new: Any, root: Path) -> bool:
    """``new`` is a path under the study folder ``root`` and ``old`` the same path under another one."""
    if not (isinstance(old, str) and isinstance(new, str)):
        return False
    try:
        relative = Path(new).relative_to(root).parts
    except ValueError:
        return False
    parts = Path(old).parts
    return len(parts) > len(relative) and parts[-len(relative):] == relative


def check_finished(cells: list[Cell], *, rerun_changed: bool = False, console: Console | None = None) -> list[Cell]:
    """Refuse to reuse a finished cell made with a different config (`changed_cells`).

    Raises `CxrDistillError` naming each such cell and its differing keys, unless ``rerun_changed``:
    then each is moved aside to ``<folder>.old-<k>/`` (kept, not deleted) and will run again.
    Returns the cells moved aside.
    """
    from cxrdistill.engine.run_dir import RunDirectory, short_value

    changed = changed_cells(cells)
    if not changed:
        return []
    if not rerun_changed:
        lines = [f"  - {cell.run_dir}: " + "; ".join(f"{k}: {short_value(a)} -> {short_value(b)}" for k, a, b in diff[:4])
                 + (f"; ... {len(diff) - 4} more" if len(diff) > 4 else "") for cell, diff in changed.items()]
        raise CxrDistillError(
            f"{len(changed)} finished cell(s) were made with a different config than the study now gives them; "
            "their results would be reused for the new settings:\n" + "\n".join(lines[:20])
            + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
            + "\nRerun with --rerun-changed to move them aside (<folder>.old-<k>/) and run them again, "
            "or choose another --output-dir.")
    for cell in changed:
        moved = RunDirectory(cell.run_dir).move_aside()
        if console is not None:
            console.print(f"config changed: {cell.run_dir} moved to {moved.name}; it runs again", highlight=False)
    return list(changed)


__all__ = ["cell_config", "cell_fingerprint", "changed_cells", "check_finished"]
