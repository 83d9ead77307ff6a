"""`cxrdistill label-reports`: mine image-level labels from reports (rule-based).

Two inputs: a manifest (labels written into its images), or `--reports CSV` with one report per
row and no images (a CSV comes out with one status column per class: positive / uncertain /
negative / absent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cxrdistill.errors import CxrDistillError


def label_reports_csv(path: Path, out: Path, vocabulary, text_col: str = "report") -> dict[str, dict[str, int]]:
    """Label every row of a reports-only CSV; writes `out` (input columns + one column per class)
    and returns per-class status counts."""
    import csv
    import io

    from cxrdistill.atomic import write_text_atomic
    from cxrdistill.labeling.labeler import label_report

    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CxrDistillError(f"{path}: reports CSV not found") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise CxrDistillError(f"{path}: line {line} is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = list(reader.fieldnames or [])
    if text_col not in columns:
        raise CxrDistillError(f"{path}: no column {text_col!r} (columns: {', '.join(columns) or 'none'}); "
                              "name the report column with --text-col")
    names = vocabulary.class_names
    clash = [n for n in names if n in columns]
    if clash:
        raise CxrDistillError(f"{path}: columns {clash} already exist; the labels would overwrite them")
    counts = {n: {s: 0 for s in ("positive", "uncertain", "negative", "absent")} for n in names}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, [*columns, *names])
    writer.writeheader()
    for row in reader:
        labels = label_report(row.get(text_col) or "", vocabulary)
        for name, status in labels.items():
            counts[name][status] += 1
        writer.writerow({**row, **labels})
    write_text_atomic(out, buf.getvalue())
    return counts


def register(app: typer.Typer) -> None:
    @app.command("label-reports")
    def label_reports(
        manifest: Optional[Path] = typer.Option(None, "--manifest", "-m", help="manifest JSON to read"),
        reports: Optional[Path] = typer.Option(None, "--reports", help="a reports-only CSV (no images) to label "
                                               "instead of a manifest"),
        text_col: str = typer.Option("report", "--text-col", help="--reports: the column holding the report text"),
        out: Path = typer.Option(..., "--out", "-o", help="manifest JSON (or, with --reports, CSV) to write"),
        vocab: Optional[Path] = typer.Option(None, "--vocab", help="vocabulary YAML (default: built-in)"),
        uncertain: str = typer.Option("ignore", help="uncertain mentions: positive | negative | ignore "
                                                      "(listed in the image's uncertain_labels)"),
        supervision: list[str] = typer.Option(["none"], "--supervision", "-s",
                                              help="label images of this supervision (repeatable)"),
        upgrade: bool = typer.Option(False, "--upgrade", help='turn labeled "none" images into "image" ones'),
        lenient: bool = typer.Option(False, "--lenient", help="skip bad manifest records instead of failing"),
        print_vocab: bool = typer.Option(False, "--print-vocab", help="print the vocabulary as YAML and exit"),
    ) -> None:
        """Label reports (negation/uncertainty aware) and write image-level labels into a manifest."""
        import yaml

        from cxrdistill.data.manifest import load_manifest
        from cxrdistill.labeling import label_manifest, load_vocab

        try:
            vocabulary = load_vocab(vocab)
            if print_vocab:
                typer.echo(yaml.safe_dump(vocabulary.to_dict(), sort_keys=False, allow_unicode=True))
                return
            if (manifest is None) == (reports is None):
                raise CxrDistillError("give exactly one of --manifest or --reports")
            if reports is not None:
                counts = label_reports_csv(reports, out, vocabulary, text_col)
                n = sum(next(iter(counts.values())).values()) if counts else 0
                typer.echo(f"labeled {n} report(s); wrote {out}")
                for name, c in counts.items():
                    typer.echo(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
                return
            data = load_manifest(manifest, on_error="lenient" if lenient else "strict", check_files=False)
            labeled, result = label_manifest(data, vocabulary, uncertain=uncertain,
                                             supervision=supervision, upgrade=upgrade)
            for issue in data.skipped:
                typer.echo(f"skipped {issue}", err=True)
            if out.resolve().parent != manifest.resolve().parent:
                typer.echo(f"note: file_names stay relative to {manifest.parent}; keep {out.name} "
                           "beside it or pass that root when loading", err=True)
            labeled.save(out)
        except (CxrDistillError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        typer.echo(f"labeled {result.labeled} image(s) from their reports "
                   f"({result.without_report} selected image(s) had no report, {result.upgraded} upgraded "
                   f"to supervision 'image'); wrote {out}")
        for name, counts in result.counts.items():
            typer.echo(f"  {name}: " + ", ".join(f"{s} {counts[s]}" for s in ("positive", "uncertain", "negative", "absent")))
