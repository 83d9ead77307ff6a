"""Experiment trackers behind Fabric's logger interface (`lightning_fabric.loggers.Logger`).

`metrics.csv` and TensorBoard (`engine.logging`) are always written; `train.loggers` adds
trackers, each an entry ``"mlflow:<tracking URI>"`` or ``"wandb:<project>"``::

    cxrdistill train --config tsd 'train.loggers=["mlflow:sqlite:///mlflow.db"]'

MLflow needs the optional extra ``mlflow``, W&B the extra ``wandb`` (set ``WANDB_MODE=offline``
to keep it off the network). One tracker run per run directory: its id is kept in
``logs/<tracker>_run_id``, so every stage and every resume logs into the same run. Metric names
are ``<stage>/<name>``; `wall_s` is logged too.
"""

from __future__ import annotations

import time
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_fabric.loggers.logger import Logger

from cxrdistill.atomic import write_text_atomic
from cxrdistill.errors import ConfigError

__all__ = ["MLflowLogger", "WandbLogger", "make_trackers"]


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out


def _remembered_id(path: Path | None) -> str | None:
    return path.read_text().strip() if path is not None and path.is_file() else None


def _remember(path: Path | None, run_id: str) -> None:
    if path is not None:
        write_text_atomic(path, run_id + "\n")


class MLflowLogger(Logger):
    """Logs to an MLflow tracking store (a local ``file:`` / ``sqlite:`` URI or a server)."""

    def __init__(self, tracking_uri: str, experiment: str = "cxrdistill", run_name: str | None = None,
                 run_id_file: Path | None = None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("train.loggers: mlflow needs the optional extra: pip install 'cxrdistill[mlflow]'") from None
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        remembered = _remembered_id(run_id_file)
        if remembered is None:
            self.run_id: str = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
            _remember(run_id_file, self.run_id)
        else:
            self.run_id = remembered
            self.client.update_run(self.run_id, status="RUNNING")

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()])

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        from mlflow.entities import Param

        flat = _flat(vars(params) if isinstance(params, Namespace) else dict(params))
        logged = {p for p in self.client.get_run(self.run_id).data.params}
        new = [Param(k, v) for k, v in flat.items() if k not in logged]  # MLflow params are write-once
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start:start + 100])

    def finalize(self, status: str) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if status == "success" else "FAILED")


class WandbLogger(Logger):
    """Logs to Weights & Biases (``WANDB_MODE=offline`` writes locally only)."""

    def __init__(self, project: str, run_name: str | None = None, directory: Path | None = None,
                 run_id_file: Path | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.loggers: wandb needs the optional extra: pip install 'cxrdistill[wandb]'") from None
        run_id = _remembered_id(run_id_file) or wandb.util.generate_id()
        _remember(run_id_file, run_id)
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow",
                              dir=str(directory) if directory else None)

    @property
    def name(self) -> str:
        return "wandb"

    @property
    def version(self) -> str:
        return str(self.run.id)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        self.run.config.update(vars(params) if isinstance(params, Namespace) else dict(params), allow_val_change=True)

    def finalize(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "success" else 1)


def make_trackers(specs: Sequence[str], run_dir: Path, hyperparams: dict[str, Any] | None = None) -> list[Logger]:
    """The trackers `train.loggers` names (``mlflow:<uri>``, ``wandb:<project>``), opened for `run_dir`."""
    loggers: list[Logger] = []
    for spec in specs:
        kind, _, target = str(spec).partition(":")
        if not target:
            raise ConfigError(f"train.loggers: {spec!r} must be 'mlflow:<tracking uri>' or 'wandb:<project>'")
        if kind == "mlflow":
            logger: Logger = MLflowLogger(target, run_name=run_dir.name, run_id_file=run_dir / "logs" / "mlflow_run_id")
        elif kind == "wandb":
            logger = WandbLogger(target, run_name=run_dir.name, directory=run_dir / "logs",
                                 run_id_file=run_dir / "logs" / "wandb_run_id")
        else:
            raise ConfigError(f"train.loggers: unknown tracker {kind!r} (mlflow, wandb; CSV and TensorBoard are always on)")
        if hyperparams:
            logger.log_hyperparams(hyperparams)
        loggers.append(logger)
    return loggers
