"""`cxrdistill export -m RUN --format onnx|folder -o OUT`: a trained model for other tools.

* ``onnx``: ``model.onnx`` (backbone + heads) + ``deploy.json`` (+ ``anchors.npy`` for detectors);
  run it with ``cxrdistill.deploy.runtime.OnnxModel`` (numpy + onnxruntime, no torch).
  Needs the optional extra ``onnx``.
* ``folder``: ``config.json`` + ``model.safetensors`` + ``README.md`` (model card); loads offline
  with ``cxrdistill predict -m OUT``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cxrdistill.errors import CxrDistillError

FORMATS = ("onnx", "folder")


def export_run(model_path: Path, out: Path, fmt: str) -> Path:
    """Export the model of a run directory (or a ``model.pt`` / model folder) to `out` in `fmt`."""
    from cxrdistill.deploy.folder import load_model

    if fmt not in FORMATS:
        raise CxrDistillError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    model, meta = load_model(model_path)
    run_dir = model_path if model_path.is_dir() else model_path.parent
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise CxrDistillError("ONNX export needs the optional extra: pip install 'cxrdistill[onnx]'") from None
        from cxrdistill.deploy.onnx_export import export_onnx

        return export_onnx(model, meta, out)
    from cxrdistill.deploy.folder import write_model_folder

    return write_model_folder(model, meta, out, run_dir=run_dir if (run_dir / "config.yaml").exists() else None)


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        model: Path = typer.Option(..., "--model", "-m", help="A run directory, its model.pt, or a model folder."),
        fmt: str = typer.Option(..., "--format", "-f", help="onnx (model.onnx + numpy post-processing) or folder "
                                "(config + safetensors + model card)."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder to write."),
    ) -> None:
        """Export a trained model as ONNX or as a self-describing model folder."""
        console = Console()
        try:
            path = export_run(model, out, fmt)
        except CxrDistillError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        console.print(f"wrote {path} ({', '.join(sorted(p.name for p in path.iterdir()))})", highlight=False,
                      soft_wrap=True)
