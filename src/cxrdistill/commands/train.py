"""`cxrdistill train --config X.yaml [key=value ...]`: run a registered recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cxrdistill.console import error as print_error
from cxrdistill.errors import CxrDistillError
from cxrdistill.run import run_training


def train(
    config: Path = typer.Option(..., "--config", "-c", help="YAML run config, or the name of a packaged one (tsd, ceird, aals ...)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Overrides such as train.lr=3e-4 method.params.kappa=0.5"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from checkpoints (default: train.resume); --no-resume moves an earlier run in the folder aside (<dir>.old-<n>) and starts over."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run directory (default: output_dir in the config)."),
) -> None:
    """Train with a recipe; finished stages are skipped and interrupted ones resume."""
    console = Console()
    try:
        metrics = run_training(config, overrides or [], resume=resume, output_dir=output_dir, console=console)
    except CxrDistillError as err:
        console.quiet = False  # every rank says why it stopped (the others were quiet while training)
        print_error(console, err)
        raise typer.Exit(code=2) from None
    if getattr(console, "final_metrics_printed", False):  # the recipe printed its titled table
        return
    table = Table(title="final metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(escape(key), f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command()(train)
