"""A remote task's log and progress, carried to the driver through the shared storage.

On the node, the stage logs (and its subprocesses write) into a file under the storage, and its
progress calls become JSON lines in a sibling file. On the driver, a tail copies new log bytes into
the usual per-stage log file (logs/MODEL/STAGE.log) and hands progress to the reporter while the task
runs, so a node that dies mid-stage still leaves its log behind. Files, not a socket: the storage
is already there on every node, and a retried task appends to the same files.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

from ..logsetup import FMT

ProgressFn = Callable[[str, float, float], None]


def remote_paths(storage: Path, model: str, stage: str, token: str) -> tuple[Path, Path]:
    d = Path(storage) / ".loradeploy-remote" / "logs" / model
    return d / f"{stage}-{token}.log", d / f"{stage}-{token}.progress"


class RemoteLog:
    """On the node: the stage's logger and progress callback, both writing under the storage."""

    def __init__(self, log_path: Path, progress_path: Path, model: str, stage: str, level: str = "INFO",
                 interval: float = 0.5, redact: Optional[logging.Filter] = None):
        self.log_path, self.progress_path = Path(log_path), Path(progress_path)
        self.log = logging.getLogger(f"loradeploy.remote.{model}.{stage}")
        self.level, self.interval, self.redact = level, interval, redact
        self._handler: Optional[logging.Handler] = None
        self._last = 0.0

    def __enter__(self) -> "RemoteLog":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log.setLevel(self.level)
        self.log.propagate = False  # the worker's own log is Ray's; ours is the stage's file only
        self._handler = logging.FileHandler(self.log_path)
        self._handler.setFormatter(FMT)
        if self.redact is not None:
            self._handler.addFilter(self.redact)
        self.log.addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._handler is not None:
            self.log.removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def progress(self, description: str, completed: float, total: float) -> None:
        now = time.monotonic()
        # throttled: a quantize reports every tensor, the storage may be NFS
        if now - self._last < self.interval and not (total and completed >= total):
            return
        self._last = now
        line = json.dumps({"d": description, "c": completed, "t": total}) + "\n"
        fd = os.open(self.progress_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


class LogTail:
    """On the driver: copy what the remote task wrote so far into the stage log; forward progress."""

    def __init__(self, log_path: Path, progress_path: Path, stage_log: Path, on_progress: ProgressFn):
        self.log_path, self.progress_path, self.stage_log = Path(log_path), Path(progress_path), Path(stage_log)
        self.on_progress = on_progress
        self._log_off = 0
        self._prog_off = 0

    def _read_new(self, path: Path, offset: int) -> bytes:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return b""

    def pump(self) -> None:
        chunk = self._read_new(self.log_path, self._log_off)
        if chunk:
            self._log_off += len(chunk)
            with open(self.stage_log, "ab") as f:
                f.write(chunk)
        data = self._read_new(self.progress_path, self._prog_off)
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next pump
        if complete:
            self._prog_off += len(complete)
            last = complete.decode(errors="replace").splitlines()[-1]
            try:
                p = json.loads(last)
                self.on_progress(str(p["d"]), float(p["c"]), float(p["t"]))
            except (ValueError, KeyError, TypeError):
                pass

    def finish(self) -> None:
        """Copy the rest, then drop the remote files (the stage log now holds everything)."""
        self.pump()
        for p in (self.log_path, self.progress_path):
            try:
                p.unlink()
            except OSError:
                pass
