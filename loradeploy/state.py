"""Per-model run records (JSON, written atomically) and per-model locks."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from .errors import LockError
from .fsutil import atomic_write_text

RECORD_VERSION = 1


def inputs_hash(inputs: dict[str, Any]) -> str:
    blob = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def record_path(state_dir: Path, model: str) -> Path:
    return Path(state_dir) / "runs" / f"{model}.json"


def load_record(state_dir: Path, model: str, log=None) -> dict:
    """The model's run record; a corrupt one is warned about and treated as empty (redo)."""
    path = record_path(state_dir, model)
    empty = {"version": RECORD_VERSION, "model": model, "stages": {}}
    if not path.exists():
        return empty
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            raise ValueError("no stages mapping")
        return data
    except (ValueError, OSError) as exc:
        if log:
            log.warning("run record %s is corrupt (%s); its stages will be redone", path, exc)
        return empty


def save_record(state_dir: Path, model: str, record: dict) -> None:
    record["updated_at"] = time.time()
    atomic_write_text(record_path(state_dir, model), json.dumps(record, indent=2, sort_keys=True, default=str))


class ModelLock:
    """An exclusive, non-blocking lock per model: two runs never write the same model."""

    def __init__(self, state_dir: Path, model: str, purpose: str = "run"):
        self.path = Path(state_dir) / "locks" / f"{model}.lock"
        self.model = model
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> "ModelLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            except OSError:
                holder = "?"
            os.close(fd)
            raise LockError(f"model {self.model} is busy ({holder or 'another loradeploy process'})",
                            hint="wait for it to finish; the lock frees itself when that process exits") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.purpose} by pid {os.getpid()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "ModelLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
