"""Memory of a server process tree: RSS of the process and its children (a supervisor and the server
it runs), and GPU memory through NVML."""
from __future__ import annotations

import contextlib
from typing import Optional


def proc_tree_rss(pid: int) -> Optional[int]:
    import psutil
    try:
        p = psutil.Process(pid)
        total = p.memory_info().rss
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += c.memory_info().rss
        return total
    except psutil.Error:
        return None


def gpu_memory_bytes(pid: int) -> Optional[int]:
    """GPU memory used by ``pid`` and its children via NVML; None without NVML or a GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    import psutil
    try:
        pids = {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        pids = {pid}
    try:
        pynvml.nvmlInit()
    except Exception:  # NVML raises its own error types; no driver means no GPU numbers
        return None
    try:
        used = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                if p.pid in pids and p.usedGpuMemory:
                    used += p.usedGpuMemory
        return used
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
