"""`cxrdistill pretrain --config pretrain_moco [key=value ...]`: self-supervised backbone pretraining.

A run like `cxrdistill train` (run directory, resume, Fabric) of the ``pretrain`` recipe in
:mod:`cxrdistill.ssl.recipe`; the backbone lands in ``RUN_DIR/model.safetensors`` for
``model.pretrained=RUN_DIR``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cxrdistill.errors import ConfigError, CxrDistillError


def pretrain(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config, or a packaged one (pretrain_moco, pretrain_byol)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Overrides such as method.params.algorithm=byol"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from checkpoints (default: train.resume)."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run directory (default: output_dir in the config)."),
) -> None:
    """Pretrain a backbone with MoCo v2 or BYOL on every non-test image (labels ignored)."""
    console = Console()
    try:
        metrics = run_pretraining(config, overrides or [], resume=resume, output_dir=output_dir, console=console)
    except CxrDistillError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    knn = metrics.get("knn_acc", float("nan"))
    console.print(f"pretraining done: kNN balanced accuracy {knn:.4f}; backbone in "
                  f"{(output_dir or '<output_dir>')}/model.safetensors (use model.pretrained=RUN_DIR)", highlight=False)


def run_pretraining(config: Path, overrides: list[str], *, resume: bool | None = None,
                    output_dir: Path | None = None, console: Console | None = None) -> dict[str, float]:
    """`run_training` of the ``pretrain`` recipe; any other ``method.name`` is a `ConfigError`."""
    import cxrdistill.ssl.recipe  # noqa: F401 - registers "pretrain"
    from cxrdistill.config import load_config
    from cxrdistill.resources import resolve_config_path
    from cxrdistill.run import run_training

    name = load_config(resolve_config_path(config), overrides).method.name
    if name != "pretrain":
        raise ConfigError(f"method.name: `cxrdistill pretrain` runs method 'pretrain', got {name!r} "
                          f"(use `cxrdistill train` for recipes)")
    return run_training(config, overrides, resume=resume, output_dir=output_dir, console=console)


def register(app: typer.Typer) -> None:
    app.command()(pretrain)
