"""Shared helpers of the bench scripts: device choice, timing, peak memory, the machine line.

Every bench takes ``--device auto|cpu|cuda[:N]`` (auto: the GPU when there is one) and
``--smoke`` (seconds, for tests), and prints one markdown table. Ratios are measured in the same
process with interleaved repeats, so the load of a shared machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Sequence

import torch


def add_common_args(parser: argparse.ArgumentParser, threads: int = 1) -> None:
    """``--device``, ``--threads`` and ``--smoke``."""
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--threads", type=int, default=threads, help="torch intra-op threads on the CPU")
    parser.add_argument("--smoke", action="store_true", help="tiny and fast (seconds): for tests")


def pick_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here")
    return device


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line(device: torch.device, threads: int | None = None) -> str:
    """One line naming the date, the CPU (cores, load average), the device and torch."""
    what = f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "CPU"
    thr = f", {threads} torch thread(s)" if threads else ""
    return (f"{_dt.date.today().isoformat()}; {cpu_model()}, {os.cpu_count()} cores, load avg "
            f"{load_average()} (1/5/15 min); device {device} ({what}){thr}; torch {torch.__version__}")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def rss_mb() -> float:
    """Resident set size of this process now (MiB)."""
    try:
        with open("/proc/self/statm", encoding="utf-8") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return max_rss_mb()


def max_rss_mb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``, MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak memory during a ``with`` block: CUDA ``max_memory_allocated`` on a GPU; on the CPU the
    highest RSS seen by a thread that samples ``/proc/self/statm`` every ``interval`` seconds."""

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device, self.interval = device, interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = rss_mb()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_mb = max(self.peak_mb, rss_mb())

    @property
    def kind(self) -> str:
        return "CUDA max allocated" if self.device.type == "cuda" else "peak RSS (sampled)"


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for ``bf16-mixed`` / ``16-mixed``; a no-op context for ``32-true``."""
    if precision == "32-true":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    return torch.autocast(device.type, dtype=dtype)
