"""Moving the files into the staging folder: system rsync over ssh when both ends have it (optional
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
from ..tools.ssh import SshTarget, ssh_failed
from ..tools.ssh_remote import RemoteListing
from ..tools.ssh_transfer import RsyncStats, local_rsync_caps, parse_rsync_stats, rsync_argv, run_transfer, scp_argv
from .staging import RESUME_DIR, SCP_PARTIAL, collect_partials, complete
from .watcher import Watcher

if TYPE_CHECKING:
    from ..config import Config


def choose_tool(cfg: "Config", listing: RemoteListing, log: logging.Logger, log_path: Path,
                t: SshTarget) -> tuple[str, bool]:
    """(tool, zstd): rsync when both ends have it, else scp."""
    want = cfg.vast.transfer
    local_ver, local_z = local_rsync_caps(log_path)
    if want == "scp":
        return "scp", False
    if listing.rsync_version is None or local_ver is None:
        side = "the remote box" if listing.rsync_version is None else "this machine"
        if want == "rsync":
            raise FetchError(f"rsync is missing on {side} and vast.transfer is rsync",
                             hint="install rsync there, or set vast.transfer: auto to fall back to scp")
        log.warning("rsync is missing on %s: falling back to scp (no resume inside a file)", side)
        return "scp", False
    both_z = "zstd" in local_z and "zstd" in listing.rsync_compress
    mode = cfg.vast.compression
    if mode == "zstd" and not both_z:
        log.warning("zstd compression requested but not supported by both rsyncs: sending uncompressed")
    # Over loopback compression only burns CPU both ends share; elsewhere zstd is cheap enough.
    zstd = both_z and (mode == "zstd" or (mode == "auto" and not t.is_loopback))
    return "rsync", zstd


def _rsync_once(t: SshTarget, run_dir: str, names: list[str], dest: Path, *, zstd: bool, append: bool,
                cfg: "Config", log_path: Path) -> RsyncStats:
    files_from = dest / ".files-from"
    files_from.write_text("".join(n + "\n" for n in names))
    v = cfg.vast
    io_timeout = max(60, 4 * v.connect_timeout_s, v.server_alive_interval_s * v.server_alive_count_max)
    argv = rsync_argv(t, run_dir, files_from, dest, compress=zstd, io_timeout=io_timeout, append=append)
    try:
        _, out = run_transfer(argv, t, log_path=log_path, timeout=v.fetch_timeout_s, what="rsync")
    finally:
        files_from.unlink(missing_ok=True)
    return parse_rsync_stats(out)


def transfer_rsync(t: SshTarget, listing: RemoteListing, names: list[str], staging: Path,
                   report: Callable[[int], None], stats: RsyncStats, *, zstd: bool, cfg: "Config",
                   log_path: Path, log: logging.Logger) -> Watcher:
    expected = {n: listing.files[n][0] for n in names}
    resumable = collect_partials(staging, listing, names)
    if resumable:
        rdir = staging / RESUME_DIR
        have = sum((rdir / n).stat().st_size for n in resumable)
        log.info("resuming %s: %.1f MiB already here", ", ".join(resumable), have / 2**20)
        stats.resumed_bytes += have
        with Watcher(staging, expected, report, mode="append"):
            stats.add(_rsync_once(t, listing.run_dir, resumable, rdir, zstd=zstd, append=True, cfg=cfg,
                                  log_path=log_path))
        for n in resumable:
            os.replace(rdir / n, staging / n)
    with Watcher(staging, expected, report, mode="rsync") as watcher:
        stats.add(_rsync_once(t, listing.run_dir, names, staging, zstd=zstd, append=False, cfg=cfg,
                              log_path=log_path))
    return watcher


def transfer_scp(t: SshTarget, listing: RemoteListing, names: list[str], staging: Path,
                 report: Callable[[int], None], stats: RsyncStats, *, zstd: bool, cfg: "Config",
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
