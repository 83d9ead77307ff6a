"""Every bench script runs in `--smoke` mode and prints its markdown table with sane numbers.

The scripts run in this process (`runpy`), so torch and the package are imported once.
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

# script, extra args, expected header cells, expected first cells of the rows
CASES = [
    ("bench_detector_train.py", [],
     ["variant", "plain images/s", "Trainer.fit images/s", "fit / plain", "plain peak MiB", "fit peak MiB", "memory"],
     ["fp32"]),
    ("bench_pseudo.py", [], ["stage", "images/s", "seconds per pass", "share of bare forward"],
     ["bare forward", "predict (forward + decode + NMS)", "generate_pseudo_labels (full pass)"]),
    ("bench_pseudo_memory.py", [],
     ["images", "RSS before pass MiB", "peak RSS MiB", "peak - before MiB", "seconds", "images/s", "chunks",
      "store MiB", "records read back"], ["200", "2,000"]),
    ("bench_data.py", [], ["loader workers", "cache -> collate -> device images/s", "+ weak/strong views images/s"],
     ["0", "1"]),
    ("profile_hotspots.py", ["--target", "pseudo"], ["op / function", "ms", "% of total", "calls"], None),
    ("bench_eval.py", [], ["evaluator", "seconds", "mAP@0.5:0.95", "identical to pycocotools"],
     ["cxrdistill (numpy)", "pycocotools"]),
    ("bench_cache.py", [], ["path", "images/s", "epoch (s)"],
     ["decode + resize every epoch", "decode-once cache (memmap rows)", "cache build, once"]),
    ("bench_engine_overhead.py", [], ["loop", "seconds", "ms/step", "ratio to plain"],
     ["plain PyTorch (run 1)", "plain PyTorch (run 2)", "Trainer.fit"]),
    ("bench_host_syncs.py", [], ["training step", "ms/step", "step-time ratio (with / without)"],
     ["with the per-step host syncs (before)", "without (now)"]),
    ("bench_sa_nms.py", [], ["implementation", "seconds per batch", "same boxes kept"],
     ["cxrdistill batched NMS (`batched_nms_sorted`)", "MONAI `batched_nms` (before)"]),
]
HOST_ONLY = {"bench_eval.py", "bench_cache.py", "bench_engine_overhead.py"}  # no --device option


def _number(cell: str) -> float | None:
    text = cell.strip("` ").replace(",", "")
    return float(text) if re.fullmatch(r"-?\d+(\.\d+)?", text) else None


def _table(out: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, f"no markdown table in:\n{out}"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert all(set(c) <= set("-: ") for c in cells[1]), "second line must be the separator"
    return cells[0], cells[2:]


@pytest.mark.parametrize("script, extra, header, first", CASES, ids=[c[0] for c in CASES])
def test_smoke_prints_a_table_of_positive_numbers(script, extra, header, first, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    device = [] if script in HOST_ONLY else ["--device", "cpu"]
    monkeypatch.setattr(sys, "argv", [script, "--smoke", *device, *extra])
    runpy.run_path(str(BENCH / script), run_name="__main__")
    head, rows = _table(capsys.readouterr().out)
    assert head == header
    assert rows and all(len(r) == len(header) for r in rows)
    if first is not None:
        assert [r[0] for r in rows] == first
    numbers = [n for r in rows for n in map(_number, r[1:]) if n is not None]
    assert numbers, "the table holds no numbers"
    assert all(n >= 0 for n in numbers)
    if script == "bench_pseudo_memory.py":  # every record was written and read back
        assert [r[-1] for r in rows] == ["200", "2,000"]
    if script.startswith("bench_") and script != "bench_pseudo_memory.py":
        rates = [_number(r[1]) for r in rows]
        assert all(rate is not None and rate > 0 for rate in rates)
