"""Experiment trackers through Fabric's logger interface: MLflow on a local file store (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxrdistill.cli import app
from cxrdistill.engine.logging import MetricsLogger
from cxrdistill.engine.trackers import make_trackers
from cxrdistill.errors import ConfigError

mlflow = pytest.importorskip("mlflow")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _file_store(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("CXRDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_mlflow_logger_is_a_fabric_logger_and_one_run_spans_stages_and_resumes(tmp_path):
    from lightning_fabric.loggers import Logger

    uri = f"file://{tmp_path / 'mlruns'}"
    run = tmp_path / "run"
    (tracker,) = make_trackers([f"mlflow:{uri}"], run, hyperparams={"train": {"lr": 0.1}, "seed": 3})
    assert isinstance(tracker, Logger)
    log = MetricsLogger(run / "metrics.csv", "teacher", trackers=[tracker])
    log.log(1, {"loss": 2.0})
    log.log(2, {"loss": 1.0})
    log.close()
    again = MetricsLogger(run / "metrics.csv", "student", trackers=make_trackers([f"mlflow:{uri}"], run))
    again.log(3, {"loss": 0.5})
    again.close()
    assert again.trackers == [] and tracker.run_id == (run / "logs" / "mlflow_run_id").read_text().strip()
    assert _history(uri, tracker.run_id, "teacher/loss") == [(1, 2.0), (2, 1.0)]
    assert _history(uri, tracker.run_id, "student/loss") == [(3, 0.5)]
    assert len(_history(uri, tracker.run_id, "teacher/wall_s")) == 2
    from mlflow.tracking import MlflowClient

    data = MlflowClient(uri).get_run(tracker.run_id)
    assert data.data.params == {"train.lr": "0.1", "seed": "3"} and data.info.status == "FINISHED"


def test_unknown_tracker_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'"):
        make_trackers(["neptune:x"], tmp_path)
    with pytest.raises(ConfigError, match="must be"):
        make_trackers(["mlflow"], tmp_path)


def test_train_logs_to_mlflow_from_the_config(tmp_path):
    uri = f"file://{tmp_path / 'mlruns'}"
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "train", "--config", str(ROOT / "configs/supervised_detector.yaml"),
        "data.synthetic={n_images: 40, image_size: 32, seed: 3}", "data.image_size=32", "train.max_steps=3",
        "train.log_every=1", "train.batch_size=2", "train.progress=false", "train.tensorboard=false",
        "model.options.fpn_channels=8", "model.options.head_convs=1", "method.params.n_boot=10",
        f'train.loggers=["mlflow:{uri}"]', "--output-dir", str(out)])
    assert res.exit_code == 0, res.output
    run_id = (out / "logs" / "mlflow_run_id").read_text().strip()
    from mlflow.tracking import MlflowClient

    keys = set(MlflowClient(uri).get_run(run_id).data.metrics)
    assert any(k.endswith("/loss") for k in keys) and any(k.endswith("/wall_s") for k in keys)
