"""Quantized tensors kept across runs, keyed by what alone determines their bytes.

Without an importance matrix a tensor's quantized bytes are a pure function of its stored bytes and
the target type (for a given quantizer version), so the key is (sha256 of the source tensor's
bytes, type, engine version). The tensors an adapter leaves alone are then quantized once per base
and reused by every other adapter and version of it.

An entry is ``<dir>/<digest[:2]>/<digest>.<TYPE>.<version>.q``: an 8-byte magic, the sha256 of the
payload, then the payload. It is written to a temporary name and renamed, so a reader sees all of
it or nothing; it is not fsynced (hundreds of entries per model would cost seconds), because a torn
entry after a crash fails its checksum, is deleted and is computed again. The bound is enforced by
dropping the least recently used entries (a hit refreshes the entry's mtime).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..tally import Tally
from .gguf_out import type_name

log = logging.getLogger(__name__)

MAGIC = b"LDQCACH1"
_HEAD = len(MAGIC) + 32
CACHE_DIRNAME = "tensor-cache"


def cache_dir(state_dir: Path) -> Path:
    return Path(state_dir) / CACHE_DIRNAME


@dataclass
class CacheStats(Tally):
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    stored: int = 0


class TensorCache:
    def __init__(self, root: Path, limit_bytes: int, version: str):
        self.root = Path(root)
        self.limit = int(limit_bytes)
        self.version = version
        self.stats = CacheStats()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def path(self, digest: str, ggml_type: int) -> Path:
        return self.root / digest[:2] / f"{digest}.{type_name(ggml_type)}.{self.version}.q"

    def get(self, digest: str, ggml_type: int, nbytes: int) -> bytes | None:
        """The cached payload, or None (a damaged or wrong-sized entry is removed)."""
        if not self.enabled:
            return None
        p = self.path(digest, ggml_type)
        try:
            blob = p.read_bytes()
        except OSError:
            self._count("misses")
            return None
        payload = memoryview(blob)[_HEAD:]
        if (blob[:len(MAGIC)] != MAGIC or len(payload) != nbytes
                or hashlib.sha256(payload).digest() != blob[len(MAGIC):_HEAD]):
            log.warning("tensor cache entry %s is damaged; computing it again", p.name)
            self._count("corrupt")
            p.unlink(missing_ok=True)
            return None
        try:
            os.utime(p)
        except OSError:
            pass
        self._count("hits")
        return bytes(payload)

    def put(self, digest: str, ggml_type: int, payload) -> None:
        if not self.enabled:
            return
        p = self.path(digest, ggml_type)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC)
                f.write(hashlib.sha256(payload).digest())
                f.write(payload)
            os.replace(tmp, p)
        except OSError as exc:   # a full disk must not fail the quantization itself
            log.warning("could not store tensor cache entry %s: %s", p.name, exc)
            tmp.unlink(missing_ok=True)
            return
        self._count("stored")

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats.bump(what)


def _entries(root: Path) -> list[tuple[Path, os.stat_result]]:
    out = []
    if root.is_dir():
        for p in root.glob("*/*"):
            try:
                out.append((p, p.stat()))
            except OSError:
                continue
    return out


def usage(root: Path) -> dict:
    ents = [(p, st) for p, st in _entries(root) if p.suffix == ".q"]
    return {"path": str(root), "entries": len(ents), "bytes": sum(st.st_size for _, st in ents)}


def trim(root: Path, limit_bytes: int, version: str | None = None, *, dry_run: bool = False) -> dict:
    """Drop partial writes, entries of other engine versions (when ``version`` is given) and then
    the least recently used entries until the rest fits ``limit_bytes``."""
    removed, freed, kept = 0, 0, []
    for p, st in _entries(root):
        stale = p.suffix != ".q" or (version is not None and not p.name.endswith(f".{version}.q"))
        if stale:
            removed, freed = removed + 1, freed + st.st_size
            if not dry_run:
                p.unlink(missing_ok=True)
        else:
            kept.append((st.st_mtime, st.st_size, p))
    kept.sort(reverse=True)   # newest first
    total = 0
    for _, size, p in kept:
        if total + size > limit_bytes:
            removed, freed = removed + 1, freed + size
            if not dry_run:
                p.unlink(missing_ok=True)
        else:
            total += size
    return {"path": str(root), "removed": removed, "freed": freed, "kept": total}


def clean(state_dir: Path, limit_bytes: int, version: str, *, dry_run: bool = False) -> list[dict]:
    """For `loradeploy clean`: what trimming the state dir's tensor cache removes (or would)."""
    root = cache_dir(state_dir)
    if not root.is_dir():
        return []
    r = trim(root, limit_bytes, version, dry_run=dry_run)
    if not r["removed"]:
        return []
    return [{"path": str(root), "size": r["freed"],
             "what": f"tensor cache: {r['removed']} entries stale or over its {limit_bytes / 2**30:g} GiB bound "
                     f"({r['kept'] / 2**30:.2f} GiB kept)"}]


class RunCache:
    """One run's quantized tensors in front of the persistent cache. ``get`` looks here, then in ``outer``
    (entries are content-addressed, so any hit there is right); ``put`` keeps them here only, so a search
    trying recipes leaves the persistent cache as the stock quantize left it. The tuned search writes
    several recipes of one F16 in passes: a later pass quantizes only the (tensor, type) pairs no earlier
    one did. The caller removes ``root`` when the run ends."""

    def __init__(self, root: Path, outer: TensorCache | None = None):
        self.local = TensorCache(root, 1 << 62, "run")
        self.outer = outer if outer is not None and outer.enabled else None

    enabled = True

    @property
    def stats(self) -> CacheStats:
        return self.local.stats

    def get(self, digest: str, ggml_type: int, nbytes: int) -> bytes | None:
        hit = self.local.get(digest, ggml_type, nbytes)
        if hit is None and self.outer is not None:
            hit = self.outer.get(digest, ggml_type, nbytes)
        return hit

    def put(self, digest: str, ggml_type: int, payload) -> None:
        self.local.put(digest, ggml_type, payload)
