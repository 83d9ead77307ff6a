"""`cxrdistill demo`: a small study on the built-in synthetic world, ending with a table and a report.

It runs the packaged study `configs/studies/demo.yaml` (supervised vs TSD vs CEIRD) with the study
runner, so a second run skips what is done and an interrupted one resumes. It ends with each
distillation recipe next to *its own teacher* (the shared supervised stage, the same checkpoint as
the supervised row) with the paired bootstrap Δ and its CI, and says plainly when distillation
did not help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from cxrdistill.errors import CxrDistillError


def teacher_verdicts(table: dict[str, Any]) -> list[dict[str, Any]]:
    """Per distillation recipe and fraction: student, own teacher, Δ with its CI, and a verdict.

    ``helped``: Δ (student − own teacher) is claimed as a gain — its CI over test images lies above
    zero and, with two seeds or more, its interval over seeds too (`study.table.claimed_direction`);
    ``hurt``: claimed as a loss; otherwise ``distillation did not help``.
    """
    from cxrdistill.study.pseudo_counts import format_summary
    from cxrdistill.study.table import claimed_direction

    out = []
    for row in table["rows"]:
        for fraction, entry in row["fractions"].items():
            cmp = entry.get("vs_teacher")
            if not cmp or cmp.get("diff") is None:
                continue
            low, high = cmp.get("ci_low"), cmp.get("ci_high")
            direction = claimed_direction(cmp)
            if direction > 0:
                verdict = "helped"
            elif direction < 0:
                verdict = "hurt (worse than its teacher)"
            elif (low is not None and low > 0) or (high is not None and high < 0):
                verdict = "distillation did not help (not consistent over seeds)"
            else:
                verdict = "distillation did not help"
            out.append({"label": row["label"], "fraction": fraction, "student": cmp["b"], "teacher": cmp["a"],
                        "diff": cmp["diff"], "ci_low": low, "ci_high": high, "verdict": verdict,
                        "pseudo": format_summary(entry.get("pseudo"))})
    return out


def print_teacher_table(table: dict[str, Any], console: Console) -> list[dict[str, Any]]:
    """The demo's last table: student vs own teacher, paired Δ and CI, and the verdict in words."""
    from rich.markup import escape
    from rich.table import Table

    verdicts = teacher_verdicts(table)
    if not verdicts:
        return verdicts
    out = Table(title=f"Student vs its own teacher ({table['metric']}, same test images, paired bootstrap 95% CI)")
    for column in ("recipe", "fraction", "own teacher", "student", "Δ student − teacher", "95% CI", "verdict"):
        out.add_column(column, justify="left" if column in ("recipe", "verdict") else "right")
    for v in verdicts:
        ci = "—" if v["ci_low"] is None else f"[{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
        out.add_row(escape(v["label"]), v["fraction"][1:], f"{v['teacher']:.3f}", f"{v['student']:.3f}",
                    f"{v['diff']:+.3f}", escape(ci), v["verdict"])
    console.print(out)
    for v in verdicts:
        if not v["verdict"].startswith("helped"):
            ci = "" if v["ci_low"] is None else f", 95% CI [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
            why = f"; pseudo-boxes from its teacher: {v['pseudo']}" if v.get("pseudo") else ""
            console.print(f"{v['label']}: {v['verdict']} (Δ {v['diff']:+.3f} vs its own teacher{ci}{why}).",
                          highlight=False)
    return verdicts


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
    print_teacher_table(result.table, console)
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
