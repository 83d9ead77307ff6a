"""Atomic writes: concurrent writers of one file never delete each other's temp files."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

from cxrdistill import atomic
from cxrdistill.atomic import atomic_write


def _temp_name(path: Path, host: str, pid: int) -> Path:
    return path.with_name(f".{path.name}.w{host}-{pid}.abc123.tmp")


def test_a_running_writers_temp_file_survives_and_dead_ones_go(tmp_path):
    path = tmp_path / "weights.bin"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    try:
        live = _temp_name(path, atomic._HOST, sleeper.pid)
        dead = _temp_name(path, atomic._HOST, int(finished.stdout))
        legacy = path.with_name(f".{path.name}.killed.tmp")
        other_host_fresh = _temp_name(path, "elsewhere", 1)
        other_host_old = _temp_name(path, "faraway", 2)
        for p in (live, dead, legacy, other_host_fresh, other_host_old):
            p.write_bytes(b"partial")
        old = time.time() - atomic.FOREIGN_TEMP_MAX_AGE_S - 60
        os.utime(other_host_old, (old, old))
        atomic_write(path, lambda f: f.write(b"done"))
        assert path.read_bytes() == b"done"
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
        assert left == sorted([live.name, other_host_fresh.name])
    finally:
        sleeper.kill()
        sleeper.wait()


def _write_many(path: str, tag: int, n: int, start) -> None:
    start.wait()
    payload = bytes([tag]) * 200_000
    for _ in range(n):
        atomic_write(path, lambda f: f.write(payload))


def test_two_processes_writing_one_file_both_succeed(tmp_path):
    """Before the fix, each writer's clean-up deleted the other's temp file mid-write."""
    path = tmp_path / "shared.safetensors"
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_many, args=(str(path), tag, 60, start)) for tag in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    data = path.read_bytes()
    assert len(data) == 200_000 and data in (b"\x01" * 200_000, b"\x02" * 200_000)
    assert not list(tmp_path.glob("*.tmp"))
