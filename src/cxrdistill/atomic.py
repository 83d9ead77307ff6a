"""Atomic file writes: a temp file in the same folder, flushed to disk, then `os.replace`d.

A reader therefore sees the old file or the new one, never half of one; a writer killed midway
leaves only a `.<name>.*.tmp` file, which is never read. After its own write succeeds,
`atomic_write` deletes the temp files of writers that died — never those of a writer still running
(two processes may write the same file at once, e.g. two runs converting the same weights).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
FOREIGN_TEMP_MAX_AGE_S = 24 * 3600  # a temp file of another host's writer older than this is stale


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _is_stale_temp(tmp: Path, name: str) -> bool:
    """Whether ``tmp`` (a ``.<name>.*.tmp`` file) was left by a writer that is no longer running.

    Our temp files are named ``.<name>.w<host>-<pid>.<random>.tmp``: on this host the writer is
    asked directly; another host's file is stale after a day; any other name (an older version's,
    or a test's ``.<name>.killed.tmp``) is stale.
    """
    match = re.fullmatch(rf"\.{re.escape(name)}\.w(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\..*\.tmp", tmp.name)
    if match is None:
        return True
    if match["host"] == _HOST:
        return not _writer_alive(int(match["pid"]))
    try:
        return time.time() - tmp.stat().st_mtime > FOREIGN_TEMP_MAX_AGE_S
    except FileNotFoundError:
        return False


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(binary_file)` on a temp file, fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.w{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    for other in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
        if _is_stale_temp(other, path.name):
            other.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def json_safe(payload: Any) -> Any:
    """`payload` with every non-finite float (NaN, ±inf; also numpy scalars) replaced by ``None``.

    ``json.dumps`` writes NaN as the bare token ``NaN``, which is not JSON: other tools (``jq``,
    JavaScript, pandas' strict readers) refuse the file. A metric that is undefined (an AP with no
    ground truth, a CI from one seed) is written as ``null`` instead; `study.table.read_metric`
    reads ``null`` back as NaN.
    """
    if isinstance(payload, dict):
        return {key: json_safe(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [json_safe(value) for value in payload]
    if isinstance(payload, float) or (hasattr(payload, "dtype") and getattr(payload, "shape", None) == ()):
        try:
            value = float(payload)
        except (TypeError, ValueError):
            return payload
        if not math.isfinite(value):
            return None
        return payload if isinstance(payload, float) else payload.item()
    return payload


def json_text(payload: Any, indent: int | None = 1, sort_keys: bool = False) -> str:
    """Strict JSON text of `payload` (non-finite floats → ``null``, paths and other objects → str)."""
    return json.dumps(json_safe(payload), indent=indent, sort_keys=sort_keys, default=str, allow_nan=False) + "\n"


def write_json_atomic(path: str | Path, payload: Any, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """Write strict JSON atomically (see `json_text`)."""
    return write_text_atomic(path, json_text(payload, indent=indent, sort_keys=sort_keys))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in ``chunk``-byte blocks (weights, manifests, exported models)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
