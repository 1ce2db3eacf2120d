"""Watching the receiving side of a transfer: bytes received for progress and, for rsync, the
SHA-256 of each file computed while it arrives.

rsync writes each file front to back into a temp name and renames it into place, so the watcher
thread reads the temp file as it grows; when the final name has the same inode and all bytes are
read, that digest stands. Anything the watcher missed is hashed by ``verify`` after the transfer.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..fsutil import datasync
from ..tools.ssh_transfer import PARTIAL_DIR
from .staging import RESUME_DIR, SCP_PARTIAL

SYNC_EVERY = 64 << 20
_RSYNC_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9]{6}$")


@dataclass
class _Tail:
    f: Any
    ino: int
    h: Any = field(default_factory=hashlib.sha256)
    offset: int = 0
    synced: int = 0


class Watcher:
    """Reports bytes received while a transfer runs and, for rsync, hashes files as they arrive."""

    def __init__(self, staging: Path, expected: dict[str, int], report: Callable[[int], None], *,
                 mode: str, interval: float = 0.2):
        self.staging = staging
        self.expected = expected
        self.report = report
        self.mode = mode                      # rsync | append | scp
        self.interval = interval
        self.digests: dict[str, tuple[str, int, int]] = {}   # name -> (sha256, inode, size)
        self._tails: dict[str, _Tail] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fetch-watch", daemon=True)
        self.temp_dirs = {"rsync": [staging, staging / PARTIAL_DIR], "append": [staging / RESUME_DIR],
                          "scp": [staging / SCP_PARTIAL]}[mode]

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._poll()     # catch the last rename
        except Exception:
            pass
        finally:
            for name in list(self._tails):
                self._close(name)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._poll()
            except Exception:   # watching is an optimisation; the verify step re-hashes what it lacks
                pass

    def _candidates(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for d in self.temp_dirs:
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for e in entries:
                if self.mode == "rsync":
                    m = _RSYNC_TEMP.match(e.name)
                    name = m.group("name") if m else None
                else:
                    name = e.name
                if name in self.expected:
                    found[name] = Path(e.path)
        return found

    def _read(self, tail: _Tail) -> None:
        fd = tail.f.fileno()
        size = os.fstat(fd).st_size
        while tail.offset < size:
            block = tail.f.read(min(8 << 20, size - tail.offset))
            if not block:
                break
            tail.h.update(block)
            tail.offset += len(block)
            if tail.offset - tail.synced >= SYNC_EVERY:
                # Write back while the transfer runs, so the fsync before the swap finds little left.
                datasync(fd)
                tail.synced = tail.offset

    def _close(self, name: str) -> None:
        tail = self._tails.pop(name, None)
        if tail is not None:
            tail.f.close()

    def _poll(self) -> None:
        cands = self._candidates()
        completed = 0
        for name, size in self.expected.items():
            final = self.staging / name
            tail = self._tails.get(name)
            if tail is not None:
                self._read(tail)
                try:
                    st = os.stat(final)
                except OSError:
                    st = None
                if st is not None and st.st_ino == tail.ino:
                    self._read(tail)
                    if tail.offset == st.st_size:
                        self.digests[name] = (tail.h.hexdigest(), tail.ino, tail.offset)
                    self._close(name)
                elif name not in cands:
                    self._close(name)      # interrupted: moved to the partial folder
            if (self.mode == "rsync" and name in cands and name not in self._tails
                    and name not in self.digests):
                try:
                    f = open(cands[name], "rb")
                    self._tails[name] = _Tail(f, os.fstat(f.fileno()).st_ino)
                    self._read(self._tails[name])
                except OSError:
                    pass
            completed += min(size, self._progress_of(name, size, cands))
        self.report(completed)

    def _progress_of(self, name: str, size: int, cands: dict[str, Path]) -> int:
        if name in self.digests:
            return size
        if name in self._tails:
            return self._tails[name].offset
        for p in (cands.get(name), self.staging / name):
            if p is None:
                continue
            try:
                n = p.stat().st_size
            except OSError:
                continue
            if p == self.staging / name and n != size:
                continue
            return n
        return 0

    def digest_for(self, path: Path, name: str) -> Optional[str]:
        d = self.digests.get(name)
        if d is None:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        return d[0] if (st.st_ino, st.st_size) == (d[1], d[2]) else None
