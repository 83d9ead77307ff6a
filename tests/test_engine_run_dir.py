"""RunDirectory: layout, environment record, early failure on unwritable dirs and full disks."""

from __future__ import annotations

import json
import socket

import pytest

from cxrdistill.config import RunConfig
from cxrdistill.engine.run_dir import RunDirectory
from cxrdistill.errors import CxrDistillError


def test_layout_config_and_environment(tmp_path):
    run = RunDirectory(tmp_path / "run", min_free_bytes=0)
    for sub in ("logs", "checkpoints", "eval"):
        assert (tmp_path / "run" / sub).is_dir()
    cfg = RunConfig.model_validate({"method": {"name": "x"}, "train": {"lr": 0.5}})
    run.write_config(cfg)
    assert "lr: 0.5" in run.config_path.read_text()
    run.write_config(cfg.model_copy(update={"output_dir": tmp_path}))
    assert (tmp_path / "run" / "config.previous.yaml").exists()  # a changed config keeps the old one
    env = json.loads(run.write_environment().read_text())
    assert env["packages"]["torch"] and env["python"] and "git_commit" in env
    assert socket.gethostname() not in json.dumps(env)
    assert run.stage_dir("teacher") == tmp_path / "run" / "checkpoints" / "teacher"
    with pytest.raises(ValueError, match="plain folder name"):
        run.stage_dir("../evil")


def test_not_enough_free_space_fails_early(tmp_path):
    with pytest.raises(CxrDistillError, match=r"MiB free, need at least .* choose another --output-dir"):
        RunDirectory(tmp_path / "run", min_free_bytes=1 << 60)


def test_unwritable_directory_fails_early(tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):  # what a read-only mount does (chmod alone does not stop root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    with pytest.raises(CxrDistillError, match=r"run directory is not writable \(Permission denied\)"):
        RunDirectory(tmp_path / "run", min_free_bytes=0)


def test_path_that_is_a_file_fails_early(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CxrDistillError, match="cannot create the run directory"):
        RunDirectory(tmp_path / "file" / "run", min_free_bytes=0)
