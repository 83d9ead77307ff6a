"""Run one recipe from a config: the one entry point of the CLI (`cxrdistill train`), the study
runner and the tests. Loads and validates the config, checks the run folder (a different config
stops, `--no-resume` moves it aside), seeds, and calls the registered recipe."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from cxrdistill.atomic import write_json_atomic


def run_training(
    config: Path,
    overrides: list[str],
    *,
    resume: bool | None = None,
    output_dir: Path | None = None,
    console: Console | None = None,
) -> dict[str, float]:
    """Load the config, prepare the run directory, seed, and call the recipe; returns its metrics."""
    import torch
    from lightning_fabric.utilities.seed import seed_everything

    from cxrdistill.config import load_config
    from cxrdistill.data.skipped import skip_sink
    from cxrdistill.data.split_policy import apply_split_policy
    from cxrdistill.data.study import resolve_data_config
    from cxrdistill.engine.context import RunContext
    from cxrdistill.engine.run_dir import RunDirectory
    from cxrdistill.methods.registry import get_method, validate_method_params
    from cxrdistill.resources import resolve_config_path

    cfg = load_config(resolve_config_path(config), overrides)
    split_line = apply_split_policy(cfg.data, resolve_config_path(config), overrides)
    if split_line:
        (console or Console()).print(split_line, highlight=False, soft_wrap=True)
    if output_dir is not None:
        cfg.output_dir = output_dir
    if resume is not None:
        cfg.train.resume = resume
    spec = get_method(cfg.method.name)
    params = validate_method_params(cfg.method.name, cfg.method.params)
    run_dir = RunDirectory(cfg.output_dir)
    ctx = RunContext.create(cfg, run_dir, console)
    if not ctx.fabric.is_global_zero:  # one copy of the progress, warnings and final table: rank 0's
        ctx.console.quiet = True
    if ctx.fabric.is_global_zero:
        resolve_data_config(cfg.data)  # the synthetic world, built once, is named in config.yaml
    ctx.fabric.barrier()
    resolve_data_config(cfg.data)
    # Every rank compares (an error stops them all); only rank 0 moves an old run aside.
    moved = run_dir.check_run(cfg, resume=cfg.train.resume, move=ctx.fabric.is_global_zero)
    if moved is not None and console is not None:
        console.print(f"--no-resume: the earlier run was moved to {escape(str(moved))}", highlight=False)
    ctx.fabric.barrier()
    if ctx.fabric.is_global_zero:
        run_dir.write_config(cfg)
        run_dir.write_environment()
        if cfg.model.pretrained is not None:  # sha256 + licence of the weights the run starts from
            from cxrdistill.models.pretrained import record_pretrained

            record_pretrained(run_dir.environment_path, cfg.model)
    seed_everything(cfg.train.seed, verbose=False)
    torch.use_deterministic_algorithms(True, warn_only=True)  # where torch offers one (docs/results.md)
    sink_path = run_dir.path / "skipped.json" if ctx.fabric.is_global_zero else None
    with skip_sink(sink_path, ctx.console):  # every record a lenient run leaves out: console + skipped.json
        metrics = dict(spec.run(cfg, params, ctx))
    if ctx.fabric.is_global_zero:
        write_json_atomic(run_dir.path / "final_metrics.json", metrics, indent=2)  # a study's "cell done" marker
    return metrics


__all__ = ["run_training"]
