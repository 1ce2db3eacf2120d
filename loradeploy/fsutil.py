"""Atomic files and links, hashing. An artifact counts as done only after its rename."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator

from .errors import disk_full

TMP_MARK = ".loradeploy-tmp"


def tmp_name_for(final: Path) -> Path:
    """A temporary sibling of ``final`` (same folder, so the rename is atomic)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}{TMP_MARK}")


def fsync_path(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                _fsync_file(child)
        _fsync_dir(path)
    else:
        _fsync_file(path)


def datasync(fd: int) -> None:
    """Write a file's data back (fdatasync); os.fsync where there is no fdatasync (macOS)."""
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def full_sync(fd: int) -> None:
    """Make a file durable before it is renamed into place. On macOS fsync only hands the data to
    the drive, whose cache can still lose it on power loss: F_FULLFSYNC flushes that too (falling
    back to fsync where the filesystem refuses it, as some network ones do)."""
    if hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        full_sync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(final: Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success fsync it and rename it to ``final``.

    On any exception the temporary file or folder is removed and ``final`` is untouched; a full disk
    or quota (ENOSPC, EDQUOT) becomes errors.DiskFullError, one line naming the output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name_for(final)
    remove_path(tmp)
    if is_dir:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp} was not written")
        fsync_path(tmp)
        if is_dir and final.exists():
            remove_path(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        remove_path(tmp)
        full = disk_full(exc, final)
        if full is not None:
            raise full from exc
        raise


@contextlib.contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_file`` (created, with its folder) for the block; other
    processes, and other threads opening it, wait. The kernel releases it if the holder dies."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as lk:
        fcntl.flock(lk.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lk.fileno(), fcntl.LOCK_UN)


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_output(final) as tmp:
        tmp.write_text(text)


def atomic_symlink(target: Path | str, link: Path) -> None:
    """Point ``link`` at ``target`` atomically: new link under a temp name, then os.replace."""
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name_for(link)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def remove_path(path: Path) -> None:
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def sha256_file(path: Path, *, chunk: int = 4 << 20, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


def dir_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def free_bytes(path: Path) -> int:
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


class HashingWriter:
    """A binary file that hashes every byte written through it: an artifact's sha256 is known when
    its last byte lands, so a multi-GB output is never read back just to be hashed.

    ``background=True`` hashes and writes in a thread, so both overlap the producer computing the
    next tensor (hashlib and file writes release the GIL); at most ``depth`` buffers wait, which
    bounds the memory it adds. write() keeps a reference to ``data``: callers hand over buffers they
    no longer change. No ``fileno()`` on purpose: anything that tried to write around the hash
    (numpy's ``tofile`` writes to the descriptor directly) fails loudly instead of a wrong digest.
    """

    def __init__(self, f, *, background: bool = False, depth: int = 2):
        self._f = f
        self._h = hashlib.sha256()
        self._pos = f.tell()
        self.nbytes = 0
        self._err: BaseException | None = None
        self._q: queue.Queue | None = None
        if background:
            self._q = queue.Queue(maxsize=depth)
            self._worker = threading.Thread(target=self._drain, name="hashing-writer", daemon=True)
            self._worker.start()

    def _put(self, data) -> None:
        self._h.update(data)
        self._f.write(data)

    def _drain(self) -> None:
        assert self._q is not None
        while True:
            data = self._q.get()
            try:
                if data is None:
                    return
                if self._err is None:
                    self._put(data)
            except BaseException as exc:   # re-raised in the writing thread
                self._err = exc
            finally:
                self._q.task_done()

    def _check(self) -> None:
        if self._err is not None:
            raise self._err

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if self._q is None:
            self._put(data)
        else:
            self._check()
            self._q.put(data)
        self.nbytes += n
        self._pos += n
        return n

    def tell(self) -> int:
        """The logical position: every byte handed to write(), written yet or not."""
        return self._pos

    def flush(self) -> None:
        if self._q is not None:
            self._q.join()
            self._check()
        self._f.flush()

    def close(self) -> None:
        if self._q is not None and self._worker.is_alive():
            self._q.put(None)
            self._worker.join()
        self._f.close()
        self._check()

    def hexdigest(self) -> str:
        if self._q is not None:
            self._q.join()
            self._check()
        return self._h.hexdigest()


@contextlib.contextmanager
def hashing_open(path: Path, *, background: bool = False) -> Iterator[HashingWriter]:
    """Open ``path`` for writing through a HashingWriter; read ``.hexdigest()`` after the block."""
    w = HashingWriter(open(path, "wb"), background=background)
    try:
        yield w
    finally:
        w.close()


def stat_fingerprint(folder: Path) -> dict[str, str]:
    """name -> "size:mtime_ns" for every file in ``folder``: a cheap stand-in for content digests of
    inputs too large to hash on every run (a base model), changed by any rewrite of a file."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            out[p.name] = f"{st.st_size}:{st.st_mtime_ns}"
    return out
