"""A study's results without its checkpoints: one small gzip file per finished cell, to keep or move.

``cxrdistill compare --study X --archive DIR`` keeps a copy of every finished cell's result files
in ``DIR/<row>/<fraction>/seed<k>.json.gz`` — the JSON / CSV / YAML files of the run folder and of
its ``eval*/`` folders (final metrics, fingerprint, config, ``metrics.csv``, pseudo-label counts,
``teacher_comparison.json``, predictions, per-image scores): what the tables, the paired
bootstraps and the report read, never a checkpoint. Before running,
it restores the archived cells the study folder lacks. So a study whose run folders live on scratch
space wiped between sessions, or that is split over machines, keeps what it finished; a restored
cell is then checked like any finished one (`study.finished.check_finished`): one made with other
settings is never reused.

File layout (``format: cxrdistill-cell/1``)::

    {"format": "cxrdistill-cell/1", "cell": {"row", "fraction", "seed"},
     "files": {"final_metrics.json": "<text>", "eval/predictions.json": "<text>", ...}}
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

from rich.console import Console

from cxrdistill.atomic import atomic_write
from cxrdistill.errors import CxrDistillError
from cxrdistill.study.spec import Cell

FORMAT = "cxrdistill-cell/1"
_RESULT_FILE = re.compile(r"(eval[A-Za-z0-9_]*/)?[A-Za-z0-9_.-]+\.(json|csv|yaml)")
"""What an archive keeps of a run folder: its top-level JSON / CSV / YAML files (metrics, fingerprint,
config, environment, ``metrics.csv``, ``teacher_comparison.json``, pseudo-label counts and
selections, …) and those of its ``eval*/`` folders; never a checkpoint, a model or a label store."""


def archive_path(archive: Path, study_root: Path, cell: Cell) -> Path:
    """``archive/<row>/<fraction>/seed<k>.json.gz`` for a cell whose run folder is under ``study_root``."""
    relative = cell.run_dir.relative_to(study_root)
    return archive / relative.parent / f"{relative.name}.json.gz"


def _allowed(name: str) -> bool:
    return _RESULT_FILE.fullmatch(name) is not None and not name.startswith(".")


def result_files(run_dir: Path) -> dict[str, str]:
    """The result files of a finished run folder: relative name → text (no checkpoints)."""
    paths = [*run_dir.iterdir(), *(p for folder in run_dir.glob("eval*") if folder.is_dir() for p in folder.iterdir())]
    files = {}
    for path in sorted(paths):
        name = path.relative_to(run_dir).as_posix()
        if path.is_file() and _allowed(name):
            files[name] = path.read_text(encoding="utf-8")
    return files


def save_cell(cell: Cell, study_root: Path, archive: Path) -> Path | None:
    """Archive a finished cell (rewritten only when its results changed: not when only the paths that
    `restore_from_archive` points at this machine differ); None when it is not finished."""
    if not cell.done:
        return None
    payload = {"format": FORMAT, "cell": {"row": cell.recipe, "fraction": cell.fraction, "seed": cell.seed},
               "files": result_files(cell.run_dir)}
    target = archive_path(archive, study_root, cell)
    if target.is_file() and _without_local_paths(_read(target)) == _without_local_paths(payload):
        return target
    data = gzip.compress(json.dumps(payload, sort_keys=True).encode("utf-8"), mtime=0)
    atomic_write(target, lambda f: f.write(data))
    return target


def _without_local_paths(payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` with its ``config.yaml``'s ``output_dir`` and ``data.manifest`` left out: where the
    run folder and the manifest are on one machine, rewritten on restore (`restore_from_archive`)."""
    import yaml

    files = dict(payload.get("files", {}))
    if "config.yaml" in files:
        config = yaml.safe_load(files["config.yaml"]) or {}
        if isinstance(config, dict):
            config.pop("output_dir", None)
            if isinstance(config.get("data"), dict):
                config["data"] = {k: v for k, v in config["data"].items() if k != "manifest"}
            files["config.yaml"] = config
    return {**payload, "files": files}


def _read(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
    except (OSError, EOFError, ValueError) as err:
        raise CxrDistillError(f"{path}: not a readable cell archive ({err}); delete it to run the cell again") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("files"), dict):
        raise CxrDistillError(f"{path}: not a cell archive of format {FORMAT!r}")
    bad = [name for name in payload["files"] if not isinstance(name, str) or not _allowed(name)]
    if bad:
        raise CxrDistillError(f"{path}: holds files an archive never writes ({bad[:3]}); refusing to restore it")
    if "final_metrics.json" not in payload["files"] or "run.json" not in payload["files"]:
        raise CxrDistillError(f"{path}: has no final_metrics.json / run.json: not a finished cell")
    return payload


def restore_cells(cells: list[Cell], study_root: Path, archive: Path, console: Console | None = None) -> list[Cell]:
    """Write back the archived result files of every unfinished cell whose run folder holds no run.

    A cell whose folder already holds a run (an interrupted one, perhaps being resumed) is left
    alone and named. A cell that another cell starts from (``init_from``: a pretraining, a shared
    stage) is restored only when every cell starting from it is finished or restored too: an archive
    holds no weights, so a cell still to run needs its source run again (to the same weights).
    ``final_metrics.json`` is written last, so a restore cut short leaves an unfinished cell, not a
    half one. Returns the restored cells.
    """
    restored = []
    available = {c.run_dir for c in cells if c.done or archive_path(archive, study_root, c).is_file()}
    needed = {c.after for c in cells if c.after is not None and c.run_dir not in available}
    for cell in cells:
        source = archive_path(archive, study_root, cell)
        if cell.done or not source.is_file():
            continue
        if cell.run_dir in needed:
            if console is not None:
                console.print(f"archive: {source} not restored: a cell still to run starts from its weights "
                              "(not archived); it runs again", highlight=False)
            continue
        if (cell.run_dir / "run.json").is_file() or (cell.run_dir / "config.yaml").is_file():
            if console is not None:
                console.print(f"archive: {source} not restored: {cell.run_dir} holds an unfinished run", highlight=False)
            continue
        files = _read(source)["files"]
        for name in sorted(files, key=lambda n: n == "final_metrics.json"):
            path = cell.run_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f, text=files[name]: f.write(text.encode("utf-8")))
        restored.append(cell)
    if restored and console is not None:
        console.print(f"archive: restored {len(restored)} finished cell(s) from {archive}", highlight=False)
    return restored


def restore_from_archive(cells: list[Cell], root: Path, archive: Path, console: Console | None = None) -> list[Cell]:
    """`study.archive.restore_cells`, then point each restored ``config.yaml`` at this machine's
    manifest and run folder (both compared by content / ignored by `check_finished`)."""
    import yaml

    from cxrdistill.atomic import write_text_atomic
    from cxrdistill.study.finished import cell_config

    restored = restore_cells(cells, root, archive, console)
    for cell in restored:
        cfg = cell_config(cell)
        path = cell.run_dir / "config.yaml"
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        saved.setdefault("data", {})["manifest"] = None if cfg.data.manifest is None else str(cfg.data.manifest)
        saved["output_dir"] = str(cell.run_dir)
        write_text_atomic(path, yaml.safe_dump(saved, sort_keys=False))
    return restored


def archive_finished(cells: list[Cell], root: Path, archive: Path) -> int:
    """Archive every finished cell (`study.archive.save_cell`); returns how many are archived."""
    return sum(save_cell(cell, root, archive) is not None for cell in cells)


__all__ = ["FORMAT", "archive_finished", "archive_path", "restore_cells", "restore_from_archive", "result_files",
           "save_cell"]
