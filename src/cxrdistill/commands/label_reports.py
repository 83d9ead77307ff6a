"""`cxrdistill label-reports`: mine image-level labels from the manifest's reports (rule-based)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cxrdistill.errors import CxrDistillError


def register(app: typer.Typer) -> None:
    @app.command("label-reports")
    def label_reports(
        manifest: Path = typer.Option(..., "--manifest", "-m", help="manifest JSON to read"),
        out: Path = typer.Option(..., "--out", "-o", help="manifest JSON to write"),
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
