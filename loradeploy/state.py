"""Artifacts, per-model run records (JSON, written atomically) and per-model locks."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from .errors import LockError
from .fsutil import atomic_write_text, sha256_file
from .paths import record_path

RECORD_VERSION = 1


@dataclass
class Artifact:
    path: str
    kind: str                      # adapter | merged_hf | gguf | report | deployment | metadata
    format: Optional[str] = None   # F16, Q4_K_M, ... for GGUFs
    size: int = 0
    sha256: Optional[str] = None
    mtime_ns: int = 0

    @classmethod
    def of(cls, path: Path, kind: str, fmt: str | None = None, *, sha256: str | None = None,
           hash_file: bool = True) -> "Artifact":
        path = Path(path)
        st = path.stat()
        digest = sha256 if sha256 is not None else (sha256_file(path) if hash_file and path.is_file() else None)
        return cls(str(path), kind, fmt, st.st_size, digest, st.st_mtime_ns)

    def intact(self) -> bool:
        """Cheap check that the file is still what we recorded (size and mtime)."""
        p = Path(self.path)
        try:
            st = p.stat()
        except OSError:
            return False
        if p.is_dir():
            return True
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns

    def to_dict(self) -> dict:
        return asdict(self)


class Status(str, Enum):
    """A stage's status, as records, outcomes and --json spell it."""

    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    UNAVAILABLE = "unavailable"
    NOT_RUN = "not_run"
    RUNNING = "running"
    DEGRADED = "degraded"      # ran to its end, with a part down or below its threshold: not ok, redone next run

    def __str__(self) -> str:
        return self.value


FINISHED = (Status.DONE, Status.SKIPPED)
# a stage whose later stages may still run (a degraded health still lets evaluate measure what is up)
COMPLETED = FINISHED + (Status.DEGRADED,)


class RunRecord:
    """A model's run record with typed access: what each stage did, with which inputs, producing what.

    Stored as JSON (state_dir/runs/MODEL.json, written atomically); nothing outside this class
    indexes the raw dict.
    """

    def __init__(self, state_dir: Path, model: str, data: dict):
        self.state_dir, self.model, self.data = Path(state_dir), model, data

    @classmethod
    def load(cls, state_dir: Path, model: str, log=None) -> "RunRecord":
        return cls(state_dir, model, load_record(state_dir, model, log))

    def save(self) -> None:
        save_record(self.state_dir, self.model, self.data)

    @property
    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    def stage(self, name: str) -> dict:
        """The stage's entry, or an empty dict when it never ran."""
        return self.data["stages"].get(name) or {}

    def set_stage(self, name: str, entry: dict) -> None:
        self.data["stages"][name] = entry

    def finished(self, name: str) -> bool:
        return self.stage(name).get("status") in FINISHED

    def info(self, name: str) -> dict:
        return self.stage(name).get("info") or {}

    def artifacts(self, name: str, kind: Optional[str] = None, fmt: Optional[str] = None) -> list[Artifact]:
        out = [Artifact(**a) for a in self.stage(name).get("artifacts", [])]
        if kind is not None:
            out = [a for a in out if a.kind == kind]
        if fmt is not None:
            out = [a for a in out if (a.format or "").upper() == fmt.upper()]
        return out

    def intact(self, name: str) -> bool:
        return all(a.intact() for a in self.artifacts(name))

    def ggufs(self, stages: tuple[str, ...] = ("convert", "quantize"), *, existing: bool = True) -> list[Artifact]:
        """The GGUFs the given stages recorded (by default only those still on disk)."""
        return [a for s in stages for a in self.artifacts(s, "gguf") if not existing or Path(a.path).exists()]


def inputs_hash(inputs: dict[str, Any]) -> str:
    blob = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


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


_HELD: dict[str, int] = {}   # 'path@thread' -> depth: re-entrant for the thread that holds it
_HELD_GUARD = threading.Lock()


class ModelLock:
    """An exclusive, non-blocking lock per model: two processes never write the same model.

    Re-entrant for the holding thread (the pipeline holds it while its deploy stage takes it again);
    another thread or process gets LockError;
    across processes it is an flock, released by the kernel when the holder dies.
    """

    def __init__(self, state_dir: Path, model: str, purpose: str = "run"):
        self.path = Path(state_dir) / "locks" / f"{model}.lock"
        self.model = model
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> "ModelLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = f"{self.path.resolve()}@{threading.get_ident()}"
        with _HELD_GUARD:
            if _HELD.get(key):
                _HELD[key] += 1
                self._key = key
                return self
        self._acquire_file()
        with _HELD_GUARD:
            self._key = key
            _HELD[key] = 1
        return self

    def _acquire_file(self) -> None:
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

    def release(self) -> None:
        key = getattr(self, "_key", None)
        if key is None:
            return
        with _HELD_GUARD:
            depth = _HELD.get(key, 0) - 1
            if depth > 0:
                _HELD[key] = depth
                self._key = None
                return
            _HELD.pop(key, None)
        self._key = None
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
