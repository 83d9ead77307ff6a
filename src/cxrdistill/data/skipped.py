"""Every record a lenient run leaves out, on the console and in ``RUN/skipped.json``.

The stages that can drop a record (prepare, cache build, train, predict, evaluate) call
:func:`report_skipped` with their issues. Inside ``cxrdistill train`` the run directory is the
sink (set by :func:`skip_sink`), so ``RUN/skipped.json`` lists each dropped record once::

    [{"stage": "cache build", "id": 7, "file": "img7.png", "record": "image 7 (img7.png)",
      "reason": "unreadable image: ... truncated ...", "action": "skipped"}]

Outside a run the issues go to the console only (stderr) — never dropped silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from cxrdistill.atomic import write_json_atomic
from cxrdistill.console import say

_IMAGE = re.compile(r"^image (?P<id>-?\d+) \((?P<file>.*)\)$", re.S)
_ANNOTATION = re.compile(r"^annotation (?P<id>\S+)(?: \(image (?P<image>\S+)\))?$")


@dataclass
class SkipSink:
    """Where skipped records go: a console and, in a run, ``<run>/skipped.json``."""

    console: Console | None = None
    path: Path | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)
    _seen: set[tuple[str, str]] = field(default_factory=set)

    def add(self, stage: str, issues: Iterable[Any]) -> int:
        """Record (and print) the issues not recorded before; returns how many were new."""
        new = 0
        for issue in issues:
            entry = issue_entry(issue, stage)
            key = (entry["record"], entry["reason"])
            if key in self._seen:
                continue
            self._seen.add(key)
            self.entries.append(entry)
            new += 1
            say(self.console or Console(stderr=True), f"skipped ({stage})", _line(issue), style="yellow")
        if new and self.path is not None:
            write_json_atomic(self.path, self.entries)
        return new


_SINK: contextvars.ContextVar[SkipSink | None] = contextvars.ContextVar("cxrdistill_skip_sink", default=None)


@contextlib.contextmanager
def skip_sink(path: Path | None, console: Console | None = None) -> Iterator[SkipSink]:
    """Send every :func:`report_skipped` inside the block to `path` (JSON list) and `console`.

    An existing `path` is read first, so a resumed run keeps the records of its earlier attempt.
    """
    sink = SkipSink(console, path)
    if path is not None and path.is_file():
        try:
            sink.entries = list(json.loads(path.read_text(encoding="utf-8")))
            sink._seen = {(e["record"], e["reason"]) for e in sink.entries}
        except (ValueError, KeyError, TypeError):
            sink.entries = []
    token = _SINK.set(sink)
    try:
        yield sink
    finally:
        _SINK.reset(token)


def report_skipped(stage: str, issues: Iterable[Any], console: Console | None = None) -> int:
    """Print and record skipped records of `stage` in the current sink (or on `console`)."""
    sink = _SINK.get()
    if sink is None:
        return SkipSink(console).add(stage, issues)
    if console is not None and sink.console is None:
        sink.console = console
    return sink.add(stage, issues)


def issue_entry(issue: Any, stage: str) -> dict[str, Any]:
    """``{"stage", "id", "file", "record", "reason", "action"}`` of a manifest `Issue` (or its text)."""
    record = str(getattr(issue, "record", "")) if hasattr(issue, "record") else str(issue).split(": ", 1)[0]
    reason = str(getattr(issue, "problem", "")) if hasattr(issue, "problem") else str(issue).split(": ", 1)[-1]
    entry: dict[str, Any] = {"stage": stage, "id": None, "file": None, "record": record, "reason": reason,
                             "action": str(getattr(issue, "action", "skipped"))}
    if m := _IMAGE.match(record):
        entry["id"], entry["file"] = int(m["id"]), m["file"]
    elif m := _ANNOTATION.match(record):  # an annotation: "id" is the annotation's, "image_id" its image's
        entry["id"] = int(m["id"]) if m["id"].lstrip("-").isdigit() else m["id"]
        image = m["image"] or (re.search(r"its image (-?\d+)", reason) or [None, None])[1]
        entry["image_id"] = int(image) if image and image.lstrip("-").isdigit() else image
    else:
        entry["file"] = record
    return entry


def _line(issue: Any) -> str:
    return str(issue)


__all__ = ["SkipSink", "issue_entry", "report_skipped", "skip_sink"]
