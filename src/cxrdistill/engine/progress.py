"""A Rich progress bar for training steps (loss, it/s, ETA) that stays quiet off a terminal."""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def progress_enabled(requested: bool = True) -> bool:
    """True when asked for, stdout is a terminal and no CI environment variable is set."""
    return requested and sys.stdout.isatty() and not os.environ.get("CI")


class StepProgress:
    """`with StepProgress(...) as bar: bar.advance(step, loss=...)`; a no-op when disabled."""

    def __init__(self, description: str, total: int, start: int = 0, *, enabled: bool = True,
                 console: Console | None = None) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TextColumn("[cyan]{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task(description, total=total, completed=start, status="", rate="")

    def __enter__(self) -> StepProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, completed: int, **values: float) -> None:
        """Set the bar to `completed` steps and show `values` (e.g. loss=0.31)."""
        if self._progress is None:
            return
        task = self._progress.tasks[0]
        speed = task.speed
        self._progress.update(
            self._task,
            completed=completed,
            status="  ".join(f"{k} {v:.4g}" for k, v in values.items()),
            rate=f"{speed:.2f} it/s" if speed else "",
        )
