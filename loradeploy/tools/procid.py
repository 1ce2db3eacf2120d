"""Which process a record names: its pid plus a start time, so that a reused pid is never taken
for it. On Linux the start time is /proc's start ticks (immune to wall-clock steps); where /proc is
missing (macOS) it is psutil's create_time alone."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional


@dataclass(frozen=True)
class Spawned:
    """A detached process: pid plus its start time, so a reused pid is never mistaken for it."""

    pid: int
    create_time: float
    log_path: Optional[Path] = None
    start_ticks: Optional[int] = None

    def as_record(self) -> dict:
        return {"pid": self.pid, "create_time": self.create_time, "start_ticks": self.start_ticks}


PROC_ROOT = "/proc"   # Linux only; where it is missing (macOS) a record names its process by create_time


def start_ticks(pid: int) -> Optional[int]:
    """When the process started, in clock ticks since boot (/proc/PID/stat field 22): unlike psutil's
    create_time on Linux (boot time from the wall clock + this), it does not move when the wall clock
    is stepped, so a record still names its process after an NTP or VM clock jump. None without
    /proc: alive() then compares psutil's create_time, which on macOS is the kernel's fixed start
    timestamp of the process (p_starttime), not recomputed from the clock."""
    try:
        with open(f"{PROC_ROOT}/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def identify(pid: int, log_path: Optional[Path] = None) -> Spawned:
    """A record of the running process ``pid``: its pid and both start times."""
    import psutil

    try:
        ctime = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        ctime = 0.0
    return Spawned(pid, ctime, log_path, start_ticks(pid))


def record_pid(p: "Spawned | Mapping | None") -> tuple[int, float]:
    if p is None:
        return 0, 0.0
    if isinstance(p, Spawned):
        return p.pid, p.create_time
    return int(p.get("pid") or 0), float(p.get("create_time") or 0.0)


def record_ticks(p: "Spawned | Mapping | None") -> Optional[int]:
    t = p.start_ticks if isinstance(p, Spawned) else (p or {}).get("start_ticks")
    return int(t) if t is not None else None
