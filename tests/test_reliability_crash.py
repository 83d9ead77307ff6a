"""Crash anywhere, lose nothing (issue #12).

A child process SIGKILLs itself (a real ``SIGKILL``: no cleanup, no ``finally``) at a chosen point
of a training run or of an offline pseudo-labeling pass: inside a step, half-way through writing a
checkpoint or a chunk, after the temporary file is written but before the rename, before the
completion marker. The next child resumes (and may be killed again); the run is then finished in
this process and compared with an uninterrupted one: identical weights (CPU, fixed seed) and
identical pseudo-label records. After every kill, whatever is on disk must load as what it claims
to be: a checkpoint is never partial, a stage or store is never marked done early.

CI kills at 2 points per chain, in forked children; ``CXR_KILL_CHAINS=all`` runs every kill point
of both catalogues, and ``CXR_KILL_MODE=spawn`` uses fresh interpreters instead of forks (the
figures in docs/reliability.md).

Full disks and read-only output directories fail before any work starts.
"""

from __future__ import annotations

import errno
import io
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from torch import nn
from typer.testing import CliRunner

from cxrdistill.engine.checkpoint import load_checkpoint
from cxrdistill.errors import CxrDistillError

TESTS = Path(__file__).resolve().parent
KillPoint = namedtuple("KillPoint", "where at")

# Training: run_toy (tests/test_engine_loop.py) trains 12 steps, checkpointing every 3.
TRAIN_POINTS = [
    KillPoint("step", 1),                # before any checkpoint: the resumed run starts over
    KillPoint("step", 5),                # between checkpoints 3 and 6
    KillPoint("ckpt_partial", 6),        # half of last.pt's temp file written
    KillPoint("ckpt_before_rename", 9),  # temp file complete, rename not done
    KillPoint("step", 11),
    KillPoint("before_done", 12),        # final checkpoint written, done.json not
]
# Pseudo-labeling: 21 training images, batches of 4, chunks of 3 records (7 chunk files uninterrupted).
PSEUDO_POINTS = [
    KillPoint("add", 2),                  # records queued in memory, no chunk written yet
    KillPoint("chunk_partial", 2),        # half of a chunk's temp file written
    KillPoint("add", 5),
    KillPoint("chunk_before_rename", 2),  # temp chunk complete, rename not done
    KillPoint("before_complete", 1),      # every chunk written, COMPLETE.json not
    KillPoint("complete_partial", 1),     # half of COMPLETE.json's temp file written
]
CI_TRAIN = [TRAIN_POINTS[1], TRAIN_POINTS[3]]
CI_PSEUDO = [PSEUDO_POINTS[1], PSEUDO_POINTS[3]]
ALL = os.environ.get("CXR_KILL_CHAINS") == "all"


# ---------------------------------------------------------------------------------------------
# the child: install one kill point, run the job


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _partial_write(handle, data: bytes) -> None:
    handle.write(data[: len(data) // 2])
    handle.flush()
    os.fsync(handle.fileno())
    _die()


def install_train_kill(point: KillPoint) -> None:
    from cxrdistill import atomic
    from cxrdistill.engine import checkpoint, loop

    state = {"step": None}
    if point.where == "step":
        original = loop.Trainer._total_loss

        def total_loss(self, losses, step):
            if step == point.at:
                _die()
            return original(self, losses, step)
        loop.Trainer._total_loss = total_loss
    elif point.where in ("ckpt_partial", "ckpt_before_rename"):
        real_save, real_replace = torch.save, os.replace

        def save(obj, handle, *args, **kwargs):
            state["step"] = obj.get("step") if isinstance(obj, dict) else None
            if point.where == "ckpt_partial" and state["step"] == point.at and "modules" in obj \
                    and "optimizer" in obj:
                buf = io.BytesIO()
                real_save(obj, buf)
                _partial_write(handle, buf.getvalue())
            return real_save(obj, handle, *args, **kwargs)

        def replace(src, dst):
            if point.where == "ckpt_before_rename" and state["step"] == point.at and str(dst).endswith("last.pt"):
                _die()
            return real_replace(src, dst)
        checkpoint.torch.save = save
        atomic.os.replace = replace
    elif point.where == "before_done":
        loop.write_json_atomic = lambda path, data: _die()
    else:
        raise ValueError(point)


def install_pseudo_kill(point: KillPoint) -> None:
    from cxrdistill.pseudo import store

    count = {"n": 0}

    def hit() -> bool:
        count["n"] += 1
        return count["n"] == point.at

    if point.where == "add":
        original_add = store.PseudoLabelWriter.add

        def add(self, image_id, record):
            if hit():
                _die()
            return original_add(self, image_id, record)
        store.PseudoLabelWriter.add = add
    elif point.where in ("chunk_partial", "chunk_before_rename", "complete_partial"):
        original_write = store.atomic_write

        def atomic_write(path, write):
            is_chunk = path.name.startswith("chunk_")
            if is_chunk == (point.where != "complete_partial") and hit():
                if point.where == "chunk_before_rename":
                    with open(path.with_name(f".{path.name}.killed.tmp"), "wb") as f:
                        write(f)
                    _die()
                buf = io.BytesIO()
                write(buf)
                with open(path.with_name(f".{path.name}.killed.tmp"), "wb") as f:
                    _partial_write(f, buf.getvalue())
            return original_write(path, write)
        store.atomic_write = atomic_write
    elif point.where == "before_complete":
        store.PseudoLabelStore.mark_complete = lambda self, *a, **k: _die()
    else:
        raise ValueError(point)


def child_main(job: str, out: str, where: str, at: str, data_root: str = "") -> None:
    torch.set_num_threads(1)
    point = KillPoint(where, int(at))
    if job == "train":
        sys.path.insert(0, str(TESTS))
        import test_engine_loop as toy

        install_train_kill(point)
        toy.run_toy(Path(out), toy.make_cfg())
    else:
        install_pseudo_kill(point)
        run_pseudo(Path(data_root), Path(out))


def run_child(job: str, out: Path, point: KillPoint, data_root: Path | None = None) -> int:
    """Run the job in a child that SIGKILLs itself at `point`; return its exit code (-9 when killed).

    By default the child is forked (it inherits the imported torch: fast); with
    `CXR_KILL_MODE=spawn` it is a fresh interpreter (as a real crash-and-restart would be).
    """
    args = (job, str(out), point.where, str(point.at), str(data_root or ""))
    if os.environ.get("CXR_KILL_MODE") == "spawn":
        return _spawn_child(args)
    proc = multiprocessing.get_context("fork").Process(target=child_main, args=args)
    proc.start()
    proc.join(240)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"child for {point} hung")
    assert proc.exitcode in (0, -signal.SIGKILL), f"child for {point} failed (exit code {proc.exitcode})"
    return proc.exitcode


def _spawn_child(args: tuple[str, ...]) -> int:
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import test_reliability_crash as t; "
              "t.child_main(*sys.argv[2:])")
    done = subprocess.run([sys.executable, "-c", script, str(TESTS), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=240, check=False,
                          env={**os.environ, "PYTHONHASHSEED": "0"})
    assert done.returncode in (0, -signal.SIGKILL), done.stderr.decode()[-3000:]
    return done.returncode


# ---------------------------------------------------------------------------------------------
# training


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in module.state_dict().values()]


def _check_train_dir(out: Path) -> None:
    """After a kill: last.pt (if any) loads completely; done.json only exists with a final last.pt."""
    stage = out / "checkpoints" / "toy"
    if (stage / "last.pt").exists():
        state = load_checkpoint(stage / "last.pt")  # never a partial file
        assert state["step"] % 3 == 0 or state["step"] == 12
    assert not (stage / "done.json").exists()


def kill_and_resume_training(tmp_path: Path, points: list[KillPoint]) -> list[str]:
    sys.path.insert(0, str(TESTS))
    import test_engine_loop as toy

    out = tmp_path / "killed"
    outcomes = []
    for point in points:
        code = run_child("train", out, point)
        assert code == -signal.SIGKILL, f"kill point {point} was never reached"
        _check_train_dir(out)
        leftovers = list((out / "checkpoints" / "toy").glob(".last.pt.*.tmp"))
        if point.where == "ckpt_partial":
            assert leftovers, "the partial checkpoint scenario did not happen"
        outcomes.append(f"{point.where}@{point.at}")
    resumed, resumed_ema, result, _ = toy.run_toy(out, toy.make_cfg())
    full, full_ema, _, _ = toy.run_toy(tmp_path / "full", toy.make_cfg())
    assert result.step == 12
    assert all(torch.equal(a, b) for a, b in zip(_weights(full), _weights(resumed)))
    assert all(torch.equal(a, b) for a, b in zip(_weights(full_ema), _weights(resumed_ema)))
    return outcomes


def test_training_killed_at_several_points_resumes_to_identical_weights(tmp_path):
    assert kill_and_resume_training(tmp_path, CI_TRAIN) == ["step@5", "ckpt_before_rename@9"]


@pytest.mark.skipif(not ALL, reason="long run: CXR_KILL_CHAINS=all")
@pytest.mark.parametrize("point", TRAIN_POINTS, ids=[f"{p.where}@{p.at}" for p in TRAIN_POINTS])
def test_training_every_kill_point(tmp_path, point):
    kill_and_resume_training(tmp_path, [point])


# ---------------------------------------------------------------------------------------------
# pseudo-labeling


class Teacher(nn.Module):
    """A fixed random conv 'teacher': per image, boxes around its K brightest cells (K varies)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        maps = torch.sigmoid(self.conv(images))  # (B, 2, S, S)
        out = []
        for m in maps:
            score, cell = m.flatten(1).max(0)  # (S*S,) best class per cell
            k = int((score > score.mean()).sum() % 5) + 1
            top = score.topk(k)
            y, x = (top.indices // m.shape[-1]).float(), (top.indices % m.shape[-1]).float()
            out.append({"boxes": torch.stack([x, y, x + 2, y + 2], 1), "scores": top.values,
                        "labels": cell[top.indices]})
        return out


def pseudo_data(root: Path):
    from cxrdistill.data.study import StudyData, synthetic_world

    manifest = synthetic_world({"n_images": 30, "image_size": 32, "seed": 2}, root)
    return StudyData.open(manifest, image_size=16, cache_dir=root / "cache").dataset("train")


def run_pseudo(data_root: Path, out: Path):
    from cxrdistill.pseudo.generate import generate_pseudo_labels
    from cxrdistill.pseudo.store import PseudoLabelStore

    teacher = Teacher()
    store = PseudoLabelStore(out, generation=1)
    return generate_pseudo_labels(lambda batch: teacher(batch["image"]), pseudo_data(data_root), store,
                                  batch_size=4, chunk_size=3, metadata={"teacher": "fixed"})


def kill_and_resume_pseudo(tmp_path: Path, points: list[KillPoint]) -> list[str]:
    from cxrdistill.pseudo.store import PseudoLabelStore

    data_root = tmp_path / "world"
    expected = run_pseudo(data_root, tmp_path / "full")  # also builds the world the children reuse
    truth = expected.read()
    out = tmp_path / "killed"
    for point in points:
        code = run_child("pseudo", out, point, data_root)
        assert code == -signal.SIGKILL, f"kill point {point} was never reached"
        store = PseudoLabelStore(out, generation=1)
        assert not store.is_complete()  # never marked complete by a killed pass
        partial = store.read(require_complete=False)  # every chunk file on disk reads completely
        assert all(_same(partial[i], truth[i]) for i in partial)
        if point.where in ("chunk_partial", "chunk_before_rename"):
            assert list(store.path.glob(".chunk_*.npz.*.tmp")), "the partial chunk scenario did not happen"
    resumed = run_pseudo(data_root, out)
    assert resumed.is_complete()
    got = resumed.read()
    assert sorted(got) == sorted(truth) and len(truth) > 4 * 3
    assert all(_same(got[i], truth[i]) for i in truth)
    assert not list(resumed.path.glob("*.tmp"))
    return [f"{p.where}@{p.at}" for p in points]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_pseudo_labeling_killed_at_several_points_resumes_to_identical_store(tmp_path):
    assert kill_and_resume_pseudo(tmp_path, CI_PSEUDO) == ["chunk_partial@2", "chunk_before_rename@2"]


@pytest.mark.skipif(not ALL, reason="long run: CXR_KILL_CHAINS=all")
def test_pseudo_labeling_every_kill_point_in_one_chain(tmp_path):
    kill_and_resume_pseudo(tmp_path, PSEUDO_POINTS)


@pytest.mark.skipif(not ALL, reason="long run: CXR_KILL_CHAINS=all")
def test_training_every_kill_point_in_one_chain(tmp_path):
    kill_and_resume_training(tmp_path, TRAIN_POINTS)


# ---------------------------------------------------------------------------------------------
# full disk, read-only output: fail in the first second, before any training


class NeverParams(BaseModel):
    pass


RAN: list[str] = []


def _register_never_method() -> None:
    from cxrdistill.methods.registry import register_method

    @register_method("reliability_never_runs", NeverParams)
    def run(cfg, params, ctx):
        RAN.append("ran")
        return {}


CONFIG = ("train: {max_steps: 5, progress: false, tensorboard: false}\n"
          "method: {name: reliability_never_runs}\ndata: {manifest: m.json, cache_dir: cache}\n")


def _train_cli(tmp_path: Path):
    from cxrdistill.cli import app

    _register_never_method()
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["train", "--config", str(config), "-o", str(tmp_path / "run")])
    return result, time.perf_counter() - start


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    from cxrdistill.engine import run_dir

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda p: usage._replace(free=200 * 2**20))
    result, seconds = _train_cli(tmp_path)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"{tmp_path / 'run'}: only 200 MiB free, need at least 1024 MiB" in text
    assert "choose another --output-dir" in text
    assert RAN == [] and seconds < 30
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


def test_read_only_output_directory_fails_before_training(tmp_path):
    from cxrdistill.engine.run_dir import RunDirectory

    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: chmod does not make the folder read-only")
        with pytest.raises(CxrDistillError, match=r"ro.*(not writable|cannot create the run directory)"):
            RunDirectory(out)
    finally:
        out.chmod(0o755)


def test_read_only_file_system_is_a_clear_cli_error(tmp_path, monkeypatch):
    """What a read-only mount does, for root as well: every create fails with EROFS."""
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    result, _ = _train_cli(tmp_path)
    assert result.exit_code == 2
    assert "run directory is not writable (Read-only file system); choose another --output-dir" in \
        " ".join(result.output.split())
    assert RAN == []


def test_full_disk_while_building_the_image_cache_is_a_clear_error(tmp_path, monkeypatch):
    from cxrdistill.data import cache as cache_module
    from cxrdistill.data.cache import ImageCache
    from test_reliability_inputs import write_png

    path = write_png(tmp_path / "a.png")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.np, "memmap", no_space)
    with pytest.raises(CxrDistillError, match=r"cache: cannot write the image cache \(No space left on device\)"):
        ImageCache.build([path], 16, tmp_path / "cache")
    left = [f.name for f in (tmp_path / "cache").iterdir() if f.suffix != ".lock"]  # builders' lock
    assert not left  # nothing half-written left behind
