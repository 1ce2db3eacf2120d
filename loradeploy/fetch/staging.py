"""The staging folder beside the adapter (``.adapter.incoming``): what a resume keeps in it, and
swapping it in as the adapter once everything is verified.

It survives failures, so a re-run resumes: finished files pass rsync's quick check, and the prefix
of an interrupted file (kept by rsync in ``.rsync-partial``) gets only the rest appended.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ResourceError
from ..fsutil import atomic_write_text, free_bytes, fsync_path, remove_path
from ..tools.ssh_remote import RemoteListing
from ..tools.ssh_transfer import PARTIAL_DIR
from .plan import ALLOWED

if TYPE_CHECKING:
    from ..config import Config

METADATA = "metadata.json"
SCP_PARTIAL = ".scp-partial"
RESUME_DIR = ".resume"          # prefixes of interrupted files, completed by appending


def staging_for(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.incoming"


def has_partials(staging: Path) -> bool:
    """Whether an earlier attempt left part of a file behind."""
    return any((staging / d).is_dir() and any((staging / d).iterdir())
               for d in (PARTIAL_DIR, RESUME_DIR, SCP_PARTIAL))


def complete(path: Path, size: int, mtime: int) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return path.is_file() and st.st_size == size and int(st.st_mtime) == mtime


def seed(staging: Path, dest: Path) -> None:
    """Start a new staging folder from hard links to the current adapter, so unchanged files pass
    rsync's quick check and a re-fetch moves nothing. rsync replaces files by rename (never
    --inplace here), so the current adapter is never written through these links."""
    if staging.exists() or not dest.is_dir():
        staging.mkdir(parents=True, exist_ok=True)
        return
    staging.mkdir(parents=True)
    for name in ALLOWED:
        src = dest / name
        if src.is_file() and not src.is_symlink():
            try:
                os.link(src, staging / name)
            except OSError:
                pass


def _prefix_size(staging: Path, name: str, size: int) -> int:
    """Bytes of an interrupted copy of ``name`` that a resume will keep."""
    best = 0
    for p in (staging / PARTIAL_DIR / name, staging / RESUME_DIR / name):
        try:
            n = p.stat().st_size
        except OSError:
            continue
        if n < size:
            best = max(best, n)
    return best


def check_disk(cfg: "Config", model: str, staging: Path, listing: RemoteListing, names: list[str]) -> None:
    need = sum(listing.files[n][0] - _prefix_size(staging, n, listing.files[n][0])
               for n in names if not complete(staging / n, *listing.files[n]))
    floor = int(cfg.performance.min_free_disk_gb * (1 << 30))
    free = free_bytes(staging)
    if free - need < floor:
        raise ResourceError(
            f"not enough disk for the {model} adapter: need {need / 2**20:.1f} MiB and "
            f"{cfg.performance.min_free_disk_gb:g} GiB kept free, {free / 2**20:.1f} MiB free at {staging.parent}",
            hint="free space, or lower performance.min_free_disk_gb")


def collect_partials(staging: Path, listing: RemoteListing, names: list[str]) -> list[str]:
    """Move usable prefixes of interrupted files into RESUME_DIR; return their names."""
    rdir = staging / RESUME_DIR
    found = []
    for name in names:
        size, mtime = listing.files[name]
        cands = [p for p in (staging / PARTIAL_DIR / name, rdir / name) if p.is_file()]
        best = max(cands, key=lambda p: p.stat().st_size, default=None)
        for p in cands:
            if p != best:
                p.unlink()
        if best is None:
            continue
        if not 0 < best.stat().st_size < size or complete(staging / name, size, mtime):
            best.unlink()
            continue
        rdir.mkdir(exist_ok=True)
        if best != rdir / name:
            os.replace(best, rdir / name)
        found.append(name)
    return found


def finalize(staging: Path, dest: Path, names: list[str], metadata: dict) -> None:
    keep = set(names)
    for entry in list(staging.iterdir()):
        if entry.name not in keep:
            remove_path(entry)
    atomic_write_text(staging / METADATA, json.dumps(metadata, indent=2) + "\n")
    fsync_path(staging)
    old = dest.parent / f".{dest.name}.old"
    remove_path(old)
    if dest.exists() or dest.is_symlink():
        os.replace(dest, old)
    os.replace(staging, dest)
    remove_path(old)
