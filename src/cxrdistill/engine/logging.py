"""Scalar metrics of a run: `metrics.csv` (always) and TensorBoard (when it imports).

`metrics.csv` is wide: columns `step, stage`, then every metric name seen so far, in order of
first appearance (loss terms, `lr`, eval metrics, `<name>/<class>` counts). A row holds the values
logged at that step; other cells are empty. Several stages share the file, told apart by `stage`.
When a new metric name appears the file is rewritten with the wider header (rare: first log,
first eval), so it always stays a valid CSV for pandas / spreadsheets. Every row also has
`wall_s`: wall-clock seconds spent in its stage so far (a resumed stage continues from its last
logged value), so a budget can be planned from a short run. Experiment trackers (MLflow, W&B)
plug in as Fabric loggers (`engine.trackers`, config `train.loggers`).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_fabric.loggers.logger import Logger
    from torch.utils.tensorboard import SummaryWriter

_log = logging.getLogger(__name__)

FIXED_COLUMNS = ("step", "stage")
WALL_CLOCK = "wall_s"


class MetricsLogger:
    """Append rows `{step, stage, **values}` to a CSV and, optionally, TensorBoard."""

    def __init__(self, csv_path: Path | str, stage: str, tensorboard_dir: Path | str | None = None,
                 trackers: Sequence[Logger] = ()) -> None:
        """`trackers`: extra `lightning_fabric.loggers.Logger`s (MLflow, W&B: `engine.trackers`)."""
        self.csv_path = Path(csv_path)
        self.trackers = list(trackers)
        self.stage = stage
        self._columns: list[str] = list(FIXED_COLUMNS)
        self._rows: list[dict[str, str]] = []
        if self.csv_path.exists() and self.csv_path.stat().st_size > 0:
            with self.csv_path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                self._columns = list(reader.fieldnames or FIXED_COLUMNS)
                self._rows = list(reader)
        self._writer = _open_tensorboard(tensorboard_dir) if tensorboard_dir is not None else None
        self._start = time.monotonic()
        self._offset = self._last_wall_clock()

    def _last_wall_clock(self) -> float:
        for row in reversed(self._rows):
            if row.get("stage") == self.stage and row.get(WALL_CLOCK):
                try:
                    return float(row[WALL_CLOCK])
                except ValueError:
                    return 0.0
        return 0.0

    def log(self, step: int, values: dict[str, float]) -> None:
        """Write one row for `step` (+ `wall_s`); non-finite values are written as `nan` / `inf`, never dropped."""
        row = {"step": str(step), "stage": self.stage}
        values = {WALL_CLOCK: round(self._offset + time.monotonic() - self._start, 3), **values}
        for name, value in values.items():
            row[name] = _format(value)
        new = [name for name in values if name not in self._columns]
        self._rows.append(row)
        if new:
            self._columns.extend(new)
            self._rewrite()
        else:
            with self.csv_path.open("a", newline="", encoding="utf-8") as handle:
                csv.DictWriter(handle, self._columns).writerow(row)
        for tracker in self.trackers:
            tracker.log_metrics({f"{self.stage}/{k}": float(v) for k, v in values.items()}, step)
        if self._writer is not None:
            for name, value in values.items():
                if name == WALL_CLOCK:
                    continue
                self._writer.add_scalar(f"{self.stage}/{name}", float(value), step)

    def truncate_after(self, step: int) -> None:
        """Drop this stage's rows logged after `step` (a resumed run logs them again)."""
        kept = [r for r in self._rows if r.get("stage") != self.stage or int(r["step"]) <= step]
        if len(kept) != len(self._rows):
            self._rows = kept
            self._rewrite()
            self._offset, self._start = self._last_wall_clock(), time.monotonic()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finalize("success")
        self.trackers = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _rewrite(self) -> None:
        tmp = self.csv_path.with_name(f".{self.csv_path.name}.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, self._columns)
            writer.writeheader()
            writer.writerows(self._rows)
        os.replace(tmp, self.csv_path)


def read_metrics(csv_path: Path | str, stage: str | None = None) -> list[dict[str, Any]]:
    """Rows of `metrics.csv` (optionally one stage) with numbers parsed; empty cells left out."""
    rows: list[dict[str, Any]] = []
    with Path(csv_path).open(newline="", encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            if stage is not None and raw["stage"] != stage:
                continue
            row: dict[str, Any] = {"step": int(raw["step"]), "stage": raw["stage"]}
            row.update({k: float(v) for k, v in raw.items() if k not in FIXED_COLUMNS and v != ""})
            rows.append(row)
    return rows


def _format(value: Any) -> str:
    value = float(value)
    if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _open_tensorboard(directory: Path | str) -> SummaryWriter | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # tensorboard is optional: the CSV always has everything
        _log.warning("TensorBoard logging is off: %s", err)
        return None
    return SummaryWriter(log_dir=str(directory))
