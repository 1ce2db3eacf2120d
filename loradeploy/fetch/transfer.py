"""Moving the files into the staging folder: rsync (>= 3) over ssh when both ends have it (optional
zstd), else scp file by file.

rsync resumes: an interrupted file's prefix, kept by rsync in ``.rsync-partial``, gets only the rest
appended (``--append-verify``) before the normal pass, whose quick check skips finished files. scp
cannot resume inside a file; it only skips files already complete.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import FetchError
from ..tools.ssh import SshTarget, install_hint, ssh_failed
from ..tools.ssh_remote import RemoteListing
from ..tools.ssh_transfer import (RsyncStats, local_rsync, parse_rsync_stats, rsync_argv, rsync_usable, run_transfer,
                                  scp_argv)
from .staging import RESUME_DIR, SCP_PARTIAL, collect_partials, complete
from .watcher import Watcher

if TYPE_CHECKING:
    from ..config import Config


def choose_tool(cfg: "Config", listing: RemoteListing, log: logging.Logger, log_path: Path,
                t: SshTarget) -> dict:
    """{"tool", "zstd", "rsync"}: rsync (>= 3 on both ends; "rsync" is the local one to run) when
    both ends have it, else scp. macOS's own rsync (2.6.9, or openrsync) lacks -s and --append-verify."""
    want = cfg.vast.transfer
    if want == "scp":
        return {"tool": "scp", "zstd": False, "rsync": None}
    local = local_rsync(log_path)
    problem = None
    if local.path is None:
        found = f" (found {', '.join(local.rejected)})" if local.rejected else ""
        problem = f"rsync >= 3 is missing on this machine{found}"
    elif not rsync_usable(listing.rsync_version):
        v = listing.rsync_version
        problem = "rsync is missing on the remote box" if v is None else \
            f"the remote box's rsync is {'.'.join(map(str, v))}, older than 3"
    if problem is not None:
        if want == "rsync":
            raise FetchError(f"{problem} and vast.transfer is rsync",
                             hint=f"install rsync 3 ({install_hint('rsync')} here), "
                                  "or set vast.transfer: auto to fall back to scp")
        log.warning("%s: falling back to scp (no resume inside a file)", problem)
        return {"tool": "scp", "zstd": False, "rsync": None}
    both_z = "zstd" in local.compress and "zstd" in listing.rsync_compress
    mode = cfg.vast.compression
    if mode == "zstd" and not both_z:
        log.warning("zstd compression requested but not supported by both rsyncs: sending uncompressed")
    # Over loopback compression only burns CPU both ends share; elsewhere zstd is cheap enough.
    zstd = both_z and (mode == "zstd" or (mode == "auto" and not t.is_loopback))
    return {"tool": "rsync", "zstd": zstd, "rsync": local.path}


def _rsync_once(t: SshTarget, run_dir: str, names: list[str], dest: Path, *, how: dict, append: bool,
                cfg: "Config", log_path: Path) -> RsyncStats:
    files_from = dest / ".files-from"
    files_from.write_text("".join(n + "\n" for n in names))
    v = cfg.vast
    io_timeout = max(60, 4 * v.connect_timeout_s, v.server_alive_interval_s * v.server_alive_count_max)
    argv = rsync_argv(t, run_dir, files_from, dest, compress=how["zstd"], io_timeout=io_timeout, append=append,
                      rsync=how["rsync"] or "rsync")
    try:
        _, out = run_transfer(argv, t, log_path=log_path, timeout=v.fetch_timeout_s, what="rsync")
    finally:
        files_from.unlink(missing_ok=True)
    return parse_rsync_stats(out)


def transfer_rsync(t: SshTarget, listing: RemoteListing, names: list[str], staging: Path,
                   report: Callable[[int], None], stats: RsyncStats, *, how: dict, cfg: "Config",
                   log_path: Path, log: logging.Logger) -> Watcher:
    expected = {n: listing.files[n][0] for n in names}
    resumable = collect_partials(staging, listing, names)
    if resumable:
        rdir = staging / RESUME_DIR
        have = sum((rdir / n).stat().st_size for n in resumable)
        log.info("resuming %s: %.1f MiB already here", ", ".join(resumable), have / 2**20)
        stats.resumed_bytes += have
        with Watcher(staging, expected, report, mode="append"):
            stats.add(_rsync_once(t, listing.run_dir, resumable, rdir, how=how, append=True, cfg=cfg,
                                  log_path=log_path))
        for n in resumable:
            os.replace(rdir / n, staging / n)
    with Watcher(staging, expected, report, mode="rsync") as watcher:
        stats.add(_rsync_once(t, listing.run_dir, names, staging, how=how, append=False, cfg=cfg,
                              log_path=log_path))
    return watcher


def transfer_scp(t: SshTarget, listing: RemoteListing, names: list[str], staging: Path,
                 report: Callable[[int], None], stats: RsyncStats, *, how: dict, cfg: "Config",
                 log_path: Path, log: logging.Logger) -> Watcher:
    part = staging / SCP_PARTIAL
    part.mkdir(exist_ok=True)
    legacy = False
    with Watcher(staging, {n: listing.files[n][0] for n in names}, report, mode="scp") as watcher:
        for name in names:
            size, mtime = listing.files[name]
            final = staging / name
            if complete(final, size, mtime):
                continue
            tmp = part / name
            remote = f"{listing.run_dir.rstrip('/')}/{name}"
            for _ in range(2):
                argv = scp_argv(t, remote, tmp, legacy=legacy)
                rc, out = run_transfer(argv, t, log_path=log_path, timeout=cfg.vast.fetch_timeout_s,
                                              what="scp", check=False)
                if rc != 0 and not legacy and "subsystem request failed" in out.lower():
                    log.warning("remote has no SFTP subsystem: retrying with legacy scp")
                    legacy = True
                    continue
                if rc != 0:
                    raise ssh_failed(out, t, "scp", rc)
                break
            else:
                raise FetchError(f"scp from {t.describe()} failed in both SFTP and legacy mode")
            os.replace(tmp, final)
            stats.bytes_received += size
            stats.literal += size
    return watcher
