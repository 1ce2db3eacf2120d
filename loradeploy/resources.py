"""Peak memory sampling, CPU/RAM budgets, free-space checks."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil

from .errors import ResourceError
from .fsutil import free_bytes

GIB = 1024 ** 3
MIB = 1024 ** 2


class PeakRSS:
    """Samples RSS of this process plus its children; ``peak_mib`` after the with-block."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        try:
            for c in me.children(recursive=True):
                try:
                    total += c.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.start = self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.peak = max(self.peak, self._sample())

    @property
    def peak_mib(self) -> float:
        return round(self.peak / MIB, 1)


def cpu_budget(max_cpu_threads: int = 0) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, max_cpu_threads) if max_cpu_threads else cores)


def memory_budget_bytes(max_memory_gb: float | None) -> int:
    total = psutil.virtual_memory().total
    return int(max_memory_gb * GIB) if max_memory_gb else int(total * 0.85)


def require_disk(path: Path, need_bytes: int, floor_gb: float, what: str) -> None:
    free = free_bytes(path)
    floor = int(floor_gb * GIB)
    if free - need_bytes < floor:
        raise ResourceError(
            f"not enough disk for {what} in {path}: needs {need_bytes / GIB:.2f} GiB + {floor_gb:g} GiB floor, "
            f"{free / GIB:.2f} GiB free",
            hint="free space, point pipeline.work_dir elsewhere, or lower performance.min_free_disk_gb")


def thread_plan(n_formats: int, budget: int, parallel: int = 0) -> tuple[int, int]:
    """(formats at once, threads each): never more busy threads than the budget."""
    if parallel <= 0:
        parallel = max(1, min(n_formats, budget // 4 or 1))
    parallel = max(1, min(parallel, n_formats, budget))
    return parallel, max(1, budget // parallel)
