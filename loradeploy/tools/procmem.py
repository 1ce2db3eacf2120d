"""Memory of a server process tree: RSS of the process and its children (a supervisor and the server
it runs), split into anonymous memory and file pages, and GPU memory through NVML.

RSS alone misleads for llama.cpp: its mmap'd weights are file pages (clean, reclaimable: the kernel
drops them under pressure and reads them again), while CPU-repacked weights, the KV cache and the
compute buffers are anonymous (what must stay in RAM). A Q4_K_M 7B server showed RSS 7.8 GB: 3.4 GB
anonymous + 4.3 GB file pages. Linux reports both per process in /proc/PID/status (RssAnon,
RssFile, RssShmem); without /proc (macOS) the private part is the physical footprint (libproc), or
psutil's split where it has one, and the rest of RSS the file-backed part.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PROC = Path("/proc")     # a module attribute, so a test can take it away


@dataclass(frozen=True)
class Memory:
    rss: int          # bytes resident
    anon: int         # private (anonymous + shared memory): what must stay in RAM
    file: int         # mapped file pages: counted in RSS, reclaimable
    source: str       # "proc" | "psutil"

    def __add__(self, other: "Memory") -> "Memory":
        return Memory(self.rss + other.rss, self.anon + other.anon, self.file + other.file, self.source)

    def as_mib(self) -> dict:
        mib = lambda b: round(b / 2**20, 1)  # noqa: E731
        return {"rss_mib": mib(self.rss), "anon_mib": mib(self.anon), "file_pages_mib": mib(self.file)}


def _from_proc(pid: int) -> Optional[Memory]:
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    kb = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            kb[key] = int(val.split()[0]) * 1024
    if "RssAnon" not in kb:
        return None
    return Memory(kb.get("VmRSS", 0), kb["RssAnon"] + kb.get("RssShmem", 0), kb.get("RssFile", 0), "proc")


def _darwin_footprint(pid: int) -> Optional[int]:
    """macOS: the physical footprint (what Activity Monitor calls Memory: no clean file pages), from
    libproc's proc_pid_rusage; None elsewhere or when it cannot be read."""
    if sys.platform != "darwin":
        return None
    import ctypes
    import ctypes.util

    class RusageInfoV2(ctypes.Structure):  # <sys/resource.h>; only the fields up to ri_phys_footprint
        _fields_ = [("uuid", ctypes.c_uint8 * 16), *((n, ctypes.c_uint64) for n in (
            "user_time", "system_time", "pkg_idle_wkups", "interrupt_wkups", "pageins", "wired_size",
            "resident_size", "phys_footprint")), ("rest", ctypes.c_uint64 * 32)]

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("proc") or "libproc.dylib")
        info = RusageInfoV2()
        if lib.proc_pid_rusage(pid, 2, ctypes.byref(info)) != 0:   # RUSAGE_INFO_V2
            return None
        return int(info.phys_footprint)
    except (OSError, AttributeError):
        return None


def process_memory(pid: int) -> Optional[Memory]:
    """One process: /proc where there is one (Linux); else psutil's RSS split by the macOS footprint,
    by psutil's ``shared`` (file-backed) pages where it has them, or by USS as the private part."""
    import psutil
    if PROC.is_dir():
        m = _from_proc(pid)
        if m is not None:
            return m
    try:
        info = psutil.Process(pid).memory_info()
        private = _darwin_footprint(pid)
        if private is None and getattr(info, "shared", None) is not None:
            private = info.rss - info.shared
        if private is None:
            try:
                private = psutil.Process(pid).memory_full_info().uss
            except (psutil.AccessDenied, AttributeError):
                private = info.rss
        private = max(0, min(private, info.rss))
        return Memory(info.rss, private, info.rss - private, "psutil")
    except psutil.Error:
        return None


def proc_tree_memory(pid: int) -> Optional[Memory]:
    """``pid`` and its children, summed (a supervisor and the server it runs)."""
    import psutil
    total = process_memory(pid)
    if total is None:
        return None
    with contextlib.suppress(psutil.Error):
        for c in psutil.Process(pid).children(recursive=True):
            m = process_memory(c.pid)
            if m is not None:
                total = total + m
    return total


def proc_tree_rss(pid: int) -> Optional[int]:
    m = proc_tree_memory(pid)
    return m.rss if m is not None else None


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
