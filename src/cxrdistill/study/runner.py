"""Run the cells of a study that are missing, skip the finished ones, then build the tables.

A cell is finished when its ``final_metrics.json`` exists (`cxrdistill train` writes it last).
A finished cell is only reused by the config that made it (`study.finished`). An interrupted cell is simply run again: the engine resumes it from its stage checkpoints, and
finished stages and stored pseudo-labels are not recomputed. So a study killed at any moment is
continued by running the same command again.

Locally the cells run one after another, in this process (``isolate=False``, the fastest) or one
``python -m cxrdistill.cli train`` subprocess per cell (``isolate=True``). On a cluster,
:func:`job_commands` gives one independent ``cxrdistill train`` command per missing cell.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from cxrdistill.errors import CxrDistillError
from cxrdistill.study.archive import archive_finished, restore_from_archive
from cxrdistill.study.finished import check_finished
from cxrdistill.study.spec import Cell, StudySpec, fraction_tag


@dataclass
class StudyResult:
    """What `run_study` did and what it found."""

    spec: StudySpec
    cells: list[Cell]
    ran: list[Cell] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)
    failed: dict[Cell, str] = field(default_factory=dict)
    table: dict[str, Any] = field(default_factory=dict)
    """The aggregated table (`study.table.build_table`)."""
    table_path: Path | None = None
    report_path: Path | None = None
    seconds: float = 0.0


def study_cells(spec: StudySpec, out_dir: Path | None = None) -> list[Cell]:
    """Every cell of the matrix, seed-major: a partly run study has every row at the first seeds.
    Within a (seed, fraction) block a row with ``init_from`` comes after the row it starts from."""
    from cxrdistill.study.data import prepared_manifest

    root = Path(out_dir or spec.output_dir)
    manifest = prepared_manifest(spec, root)
    rows = _dependency_order(spec)
    cells = []
    for seed in spec.seeds:
        for fraction in spec.fractions:
            tail = Path(fraction_tag(fraction)) / f"seed{seed}"
            for name in rows:
                row = spec.rows[name]
                if fraction not in spec.row_fractions(name):
                    continue
                after = None
                if row.init_from is not None:
                    after = root / row.init_from / fraction_tag(spec.source_fraction(name, fraction)) / f"seed{seed}"
                start = "init_from" if row.init_as == "stage" else "model.pretrained"
                overrides = (*((f"data.manifest={manifest}",) if manifest is not None else ()),
                             *spec.overrides, *row.overrides, *spec.command_line, f"{spec.fraction_key}={fraction:g}",
                             *(f"{key}={seed}" for key in spec.seed_keys),
                             *((f"{start}={after}",) if after is not None else ()))
                cells.append(Cell(name, fraction, seed, spec.config_path(name), overrides, root / name / tail, after))
    return cells


def _dependency_order(spec: StudySpec) -> list[str]:
    """The rows in file order, except that a row comes after the row its ``init_from`` names."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        source = spec.rows[name].init_from
        if source is not None:
            visit(source)
        order.append(name)

    for name in spec.rows:
        visit(name)
    return order


def ready(cell: Cell) -> bool:
    """Whether the cell can start: it has no ``init_from`` cell, or that cell is finished."""
    return cell.after is None or (cell.after / "final_metrics.json").is_file()


def job_commands(spec: StudySpec, out_dir: Path | None = None, program: str = "cxrdistill",
                 only: list[str] | None = None) -> list[str]:
    """One shell command per missing cell that can start now (for a job array); finished cells are
    left out, and so are cells whose ``init_from`` cell is not finished yet (print again after it).
    ``only``: just the cells matching these patterns (`select_cells`)."""
    return [shlex.join([program, *cell.train_args()]) for cell in select_cells(study_cells(spec, out_dir), only)
            if not cell.done and ready(cell)]


def run_cell(cell: Cell, *, isolate: bool = False, console: Console | None = None) -> None:
    """Train one cell (in this process, or in a subprocess when ``isolate``); raises on failure."""
    if isolate:
        cmd = [sys.executable, "-m", "cxrdistill.cli", *cell.train_args()]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
            raise CxrDistillError(f"{cell.run_dir}: `cxrdistill train` exited with {done.returncode}:\n"
                                  + "\n".join(tail))
        return
    from cxrdistill.run import run_training

    run_training(cell.config, list(cell.overrides), output_dir=cell.run_dir, console=console)


def cell_key(cell: Cell) -> str:
    """``row/f<fraction>/seed<k>``: the cell's folder under the study folder, what ``--cells`` matches."""
    return f"{cell.recipe}/{fraction_tag(cell.fraction)}/seed{cell.seed}"


def select_cells(cells: list[Cell], patterns: list[str] | None) -> list[Cell]:
    """The cells whose `cell_key` matches one of the shell patterns (e.g. ``tsd/*/seed0``,
    ``*/f0.1/*``), in study order; all cells without patterns. A pattern that matches no cell is an
    error (a typo would otherwise run nothing)."""
    if not patterns:
        return cells
    from fnmatch import fnmatchcase

    unmatched = [p for p in patterns if not any(fnmatchcase(cell_key(c), p) for c in cells)]
    if unmatched:
        examples = ", ".join(cell_key(c) for c in cells[:3])
        raise CxrDistillError(f"--cells {unmatched[0]!r} matches no cell of the study (cells are named like "
                              f"{examples}; use shell patterns such as 'tsd/*/seed0')")
    return [c for c in cells if any(fnmatchcase(cell_key(c), p) for p in patterns)]


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → (K, N) with 0 <= K < N; `ValueError` otherwise."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r}: write K/N, e.g. 0/2") from None
    if not 0 <= k < n:
        raise ValueError(f"shard {text!r}: need 0 <= K < N")
    return k, n


def shard_cells(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """This runner's share of the matrix: N runners with K = 0..N-1 share it without overlap, and a
    restarted runner gets the same cells back. Within each (seed, fraction) block the rows are
    dealt round-robin, starting one runner further at every block, so a slow recipe is spread
    over all runners instead of always landing on the same one. A cell with ``init_from`` goes to
    the runner of the cell it starts from (which comes before it in ``cells``)."""
    if shard is None:
        return cells
    k, n = shard
    block_of: dict[tuple[int, float], int] = {}
    position: dict[tuple[int, float], int] = {}
    runner_of: dict[Path, int] = {}
    out = []
    for cell in cells:
        if cell.after is not None and cell.after in runner_of:
            runner = runner_of[cell.after]
        else:
            key = (cell.seed, cell.fraction)
            block = block_of.setdefault(key, len(block_of))
            i = position.get(key, 0)
            position[key] = i + 1
            runner = (i + block) % n
        runner_of[cell.run_dir] = runner
        if runner == k:
            out.append(cell)
    return out


def run_study(spec: StudySpec, out_dir: Path | None = None, console: Console | None = None, *,
              isolate: bool = False, keep_going: bool = True, report: bool = True,
              shard: tuple[int, int] | None = None, rerun_changed: bool = False,
              archive: Path | None = None, only: list[str] | None = None) -> StudyResult:
    """Run the missing cells, skip the finished ones, write ``table.{json,md}`` (and the HTML report).

    ``keep_going``: a failing cell is recorded and the study goes on (the table leaves it out);
    otherwise the first failure raises. ``shard=(K, N)``: run only this runner's share of the
    cells (`shard_cells`), so N processes can work on one study side by side; the table covers
    every finished cell. A finished cell made with a different config stops the study before
    anything runs (`check_finished`; ``rerun_changed``: it is moved aside and run again).
    ``only``: run just the cells matching these patterns (`select_cells`; the table still covers
    every finished cell). ``archive``: first restore the finished cells archived there that the study folder lacks, and
    archive each cell as it finishes, and every finished cell at the end (`study.archive`).
    Returns a :class:`StudyResult`.
    """
    from cxrdistill.study.data import prepare_data
    from cxrdistill.study.table import build_table, print_table, write_table

    console = console or Console()
    root = Path(out_dir or spec.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prepare_data(spec, root, console)
    cells = study_cells(spec, root)
    if archive is not None:
        restore_from_archive(cells, root, archive, console)
    check_finished(cells, rerun_changed=rerun_changed, console=console)
    result = StudyResult(spec, cells)
    mine = shard_cells(select_cells(cells, only), shard)
    todo = [c for c in mine if not c.done]
    result.skipped = [c for c in mine if c.done]
    share = f" (shard {shard[0]}/{shard[1]}: {len(mine)} of them)" if shard else \
        (f" ({len(mine)} chosen by --cells)" if only else "")
    console.print(f"study {spec.name!r}: {len(cells)} cells{share}, {len(result.skipped)} finished, "
                  f"{len(todo)} to run → {root}", highlight=False)
    for n, cell in enumerate(todo, 1):
        console.print(f"[{n}/{len(todo)}] {cell.recipe} fraction={cell.fraction:g} seed={cell.seed}", highlight=False)
        if not ready(cell):
            result.failed[cell] = f"its init_from cell {cell.after} is not finished"
            console.print(f"[red]skipped:[/] {cell.run_dir}: {result.failed[cell]}", highlight=False)
            if not keep_going:
                raise CxrDistillError(f"{cell.run_dir}: {result.failed[cell]}")
            continue
        try:
            run_cell(cell, isolate=isolate, console=console)
            result.ran.append(cell)
            if archive is not None:
                archive_finished([cell], root, archive)
        except (CxrDistillError, ValueError, RuntimeError) as err:
            if not keep_going:
                raise
            result.failed[cell] = f"{type(err).__name__}: {err}"
            console.print(f"[red]failed:[/] {cell.run_dir}: {err}", highlight=False)
    if archive is not None:
        console.print(f"archive: {archive_finished(cells, root, archive)} finished cell(s) in {archive}", highlight=False)
    result.table = build_table(spec, cells)
    result.table_path = write_table(result.table, root)
    print_table(result.table, console)
    if report:
        from cxrdistill.study.report import build_study_report

        result.report_path = build_study_report(spec, cells, result.table, root)
        console.print(f"HTML report: {result.report_path}", highlight=False)
    result.seconds = time.perf_counter() - start
    return result


__all__ = ["Cell", "StudyResult", "cell_key", "fraction_tag", "job_commands", "parse_shard", "ready", "run_cell",
           "run_study", "select_cells", "shard_cells", "study_cells"]
