"""`cxrdistill demo`: a small study on the built-in synthetic world, ending with a table and a report.

It runs the packaged study `configs/studies/demo.yaml` (supervised vs TSD vs CEIRD) with the study
runner, so a second run skips what is done and an interrupted one resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cxrdistill.errors import CxrDistillError


def run_demo(out: Path, seeds: int = 1, overrides: list[str] | None = None, console: Console | None = None):
    """Run the demo study into `out`; returns the `StudyResult`."""
    from cxrdistill.resources import resolve_config_path
    from cxrdistill.study.runner import run_study
    from cxrdistill.study.spec import load_study

    console = console or Console()
    spec = load_study(resolve_config_path("demo", "studies"), overrides or [])
    spec.seeds = list(range(seeds))
    console.rule("cxrdistill demo")
    console.print("Synthetic chest X-ray world: 5 lesion classes, noisy radiology reports. "
                  f"{spec.fractions[0]:.0%} of training patients keep their boxes; the rest are "
                  "unlabeled images with reports.\nRecipes: " + ", ".join(spec.label(r) for r in spec.recipes)
                  + f"; seeds: {spec.seeds}; output: {out}", highlight=False)
    result = run_study(spec, out, console)
    console.rule("done")
    console.print(f"table: {result.table_path}\nHTML report: {result.report_path}", highlight=False)
    return result


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Where the demo's runs, table and report go."),
        seeds: int = typer.Option(1, "--seeds", help="Seeds per recipe (3 gives error bars)."),
        overrides: Optional[list[str]] = typer.Argument(None, help="Overrides for every run, e.g. train.max_steps=50"),
    ) -> None:
        """Supervised vs TSD vs CEIRD on the synthetic world: a table and an HTML report in minutes."""
        try:
            result = run_demo(out, seeds, overrides or [], Console())
        except CxrDistillError as err:
            Console().print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        if result.failed:
            raise typer.Exit(code=1)
