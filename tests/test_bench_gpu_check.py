"""`bench/gpu_check.sh --smoke` runs on the CPU and writes the table of docs/benchmarks.md §0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]


def test_gpu_check_smoke_writes_the_benchmarks_table(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _table(out.read_text(encoding="utf-8"))
    docs = _table((ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8"))
    assert rows[0] in docs  # the same header as the GPU table of docs/benchmarks.md
    body = {r[0]: r for r in rows[2:]}
    assert list(body) == ["train, plain loop", "train, Trainer.fit", "pseudo-label, bare forward",
                          "pseudo-label, full pass", "DDP smoke (1 process)"]
    assert body["DDP smoke (1 process)"][-1] == "pass"
    for name in list(body)[:4]:  # positive rates and achieved TFLOP/s from the counted FLOPs
        rate, tflops = float(body[name][2].replace(",", "")), float(body[name][4])
        assert rate > 0 and tflops >= 0
    assert re.fullmatch(r"\d+\.\d{3}", body["train, Trainer.fit"][3])
