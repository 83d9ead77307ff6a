"""`cxrdistill compare --study configs/studies/X.yaml`: run a study matrix and print its tables."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cxrdistill.errors import CxrDistillError


def compare(
    study: Path = typer.Option(..., "--study", "-s", help="Study YAML (rows × labeled fractions × seeds)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Overrides for every cell, e.g. train.max_steps=50"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Study directory (default: the study's output_dir)."),
    print_jobs: bool = typer.Option(False, "--print-jobs", help="Print one `cxrdistill train` command per missing cell that can start now, and exit."),
    table_only: bool = typer.Option(False, "--table-only", help="Run nothing: rebuild the table from the finished cells."),
    isolate: bool = typer.Option(False, "--isolate", help="Run each cell in its own subprocess."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write the HTML report."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: run every N-th cell from the K-th, so N "
                                        "runners (K = 0..N-1) share the study, e.g. one per core or GPU."),
    rerun_changed: bool = typer.Option(False, "--rerun-changed", help="Finished cells made with a different config "
                                       "than the study now gives them are moved aside (<folder>.old-<k>/) and run "
                                       "again (without it the study stops and lists them)."),
    cells: Optional[list[str]] = typer.Option(None, "--cells", help="Run only the cells matching this shell "
                                              "pattern over row/f<fraction>/seed<k> (repeatable), e.g. "
                                              "'tsd/*/seed0' or '*/f0.1/*'; the table covers every finished cell."),
    archive: Optional[Path] = typer.Option(None, "--archive", help="Folder that keeps every finished cell's results "
                                           "(no checkpoints; one small file per cell): restored into the study "
                                           "folder first, updated as cells finish."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder of the study's data source "
                                             "(replaces its data.root, e.g. where the data set lives on this machine)."),
) -> None:
    """Run the missing cells of a study (finished ones are skipped), then print and save one table."""
    from cxrdistill.study.archive import archive_finished, restore_from_archive
    from cxrdistill.study.finished import check_finished
    from cxrdistill.study.runner import job_commands, parse_shard, run_study, study_cells
    from cxrdistill.study.spec import load_study
    from cxrdistill.study.table import build_table, print_table, write_table

    console = Console()
    try:
        shard_of = parse_shard(shard) if shard else None
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--shard") from None
    try:
        from cxrdistill.resources import resolve_config_path

        spec = load_study(resolve_config_path(study, "studies"), overrides or [])
        if data_root is not None:
            if spec.data is None:
                raise typer.BadParameter("the study has no data source", param_hint="--data-root")
            spec.data.root = data_root
        if print_jobs:
            from cxrdistill.study.data import prepare_data
            from cxrdistill.study.runner import ready

            root = Path(output_dir or spec.output_dir)
            prepare_data(spec, root)
            if archive is not None:
                restore_from_archive(study_cells(spec, root), root, archive)
            check_finished(study_cells(spec, root), rerun_changed=rerun_changed)
            for line in job_commands(spec, output_dir, only=cells):
                typer.echo(line)
            waiting = [c for c in study_cells(spec, output_dir) if not c.done and not ready(c)]
            if waiting:  # on stderr: stdout stays one command per line
                typer.echo(f"# {len(waiting)} more cell(s) start from a cell above (init_from): "
                           "print the jobs again when those finished", err=True)
            return
        if table_only:
            root = Path(output_dir or spec.output_dir)
            root.mkdir(parents=True, exist_ok=True)
            every_cell = study_cells(spec, root)  # the table covers every finished cell, whatever --cells says
            if archive is not None:
                restore_from_archive(every_cell, root, archive, console)
            check_finished(every_cell)  # a table never mixes in cells made with other settings
            if archive is not None:
                archive_finished(every_cell, root, archive)
            table = build_table(spec, every_cell)
            print_table(table, console)
            console.print(f"table: {write_table(table, root)}", highlight=False)
            return
        result = run_study(spec, output_dir, console, isolate=isolate, report=report, shard=shard_of,
                           rerun_changed=rerun_changed, archive=archive, only=cells)
    except CxrDistillError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    console.print(f"table: {result.table_path}", highlight=False)
    if result.failed:
        console.print(f"[red]{len(result.failed)} cell(s) failed[/]; rerun the command to retry them", highlight=False)
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command()(compare)
