"""A remote fetch from start to finish: resolve the box, open one shared SSH connection, then list,
transfer while the box hashes, verify; re-fetch a wrong file once; swap the staging folder in.

One connection (ControlMaster) serves listing, hashing and transfer. Only after every file matches
the SHA-256 computed on the box is ``metadata.json`` written and the staging folder swapped in as
the adapter folder.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import FetchError, LoradeployError, ResourceError
from ..fsutil import remove_path
from ..tools.ssh import SshTarget, shared_connection
from ..tools.ssh_remote import RemoteHash, RemoteListing, probe, remote_hashes
from ..tools.ssh_transfer import RsyncStats
from ..tools.vastai import resolve_instance
from .plan import ALLOWED, Plan, files_to_fetch, ssh_target
from .staging import check_disk, finalize, has_partials, seed, staging_for
from .transfer import choose_tool, transfer_rsync, transfer_scp
from .verify import ProgressFn, Problem, verify_files

if TYPE_CHECKING:
    from ..config import Config


def no_progress(description: str, completed: float, total: float) -> None:
    return None


class _Background:
    """Run one function in a thread; result() re-raises its exception."""

    def __init__(self, fn: Callable[[], Any]):
        self._result: Any = None
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._result = fn()
        except BaseException as exc:
            self._exc = exc

    def result(self, timeout: float | None = None) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise FetchError("remote sha256 did not finish in time")
        if self._exc is not None:
            raise self._exc
        return self._result


def fetch_remote(cfg: "Config", model: str, plan: Plan, dest: Path, *, log: logging.Logger,
                 log_path: Path, progress: ProgressFn = no_progress) -> dict:
    """Fetch a remote adapter into ``dest`` (a folder); return its metadata."""
    v = cfg.vast
    t0 = time.monotonic()
    host, port, instance = plan.host, plan.port, {}
    if plan.instance_id is not None:
        ep = resolve_instance(plan.instance_id, api_key=v.api_key, api_url=v.api_url,
                              timeout=v.connect_timeout_s + 15)
        host, port = ep.host, ep.port
        instance = {"id": ep.instance_id, "direct": ep.direct}
        log.info("vast.ai instance %s is at %s:%s (%s)", ep.instance_id, host, port, "direct" if ep.direct else "proxy")
    t = ssh_target(cfg, host, port, plan.user)
    instance.update(host=t.bare_host, port=t.port, user=t.user)
    with shared_connection(t, log_path) as shared:
        return _fetch_over(shared, cfg, model, plan, Path(dest), instance, t0, log=log, log_path=log_path,
                           progress=progress)


@dataclass
class _Round:
    listing: RemoteListing
    names: list[str]
    local: dict[str, str]
    problems: list[Problem]
    hasher: Optional[str]


def _one_round(t: SshTarget, cfg: "Config", model: str, plan: Plan, staging: Path, how: dict,
               stats: RsyncStats, *, log: logging.Logger, log_path: Path, progress: ProgressFn) -> _Round:
    """List, then transfer while the box hashes, then verify."""
    v = cfg.vast
    listing = probe(t, out_dir=plan.out_dir, run=plan.run, run_dir=plan.path, names=list(ALLOWED),
                    log_path=log_path)
    names = files_to_fetch(listing, t, log)
    if not how:
        how.update(choose_tool(cfg, listing, log, log_path, t))
        log.info("fetching %s from %s:%s with %s%s", model, t.describe(), listing.run_dir, how["tool"],
                 " (zstd)" if how["zstd"] else "")
    check_disk(cfg, model, staging, listing, names)
    expected = {n: listing.files[n][0] for n in names}
    total = sum(expected.values())
    hash_job = None
    if v.verify_sha256:
        hash_job = _Background(lambda: remote_hashes(t, listing.run_dir, names, log_path=log_path,
                                                     timeout=v.fetch_timeout_s))
    transfer_error: BaseException | None = None
    report = lambda done: progress(f"fetch {model}", done, total)  # noqa: E731
    try:
        move = transfer_rsync if how["tool"] == "rsync" else transfer_scp
        watcher = move(t, listing, names, staging, report, stats, how=how, cfg=cfg, log_path=log_path, log=log)
    except (LoradeployError, OSError) as exc:
        transfer_error = exc
    remote: dict[str, RemoteHash] = {}
    hasher = None
    if hash_job is not None:
        try:
            # After a failed transfer, wait only briefly: its error is the one to report.
            hasher, remote = hash_job.result(timeout=30 if transfer_error else None)
        except LoradeployError:
            if transfer_error is None:
                raise
    if isinstance(transfer_error, OSError) and transfer_error.errno == 28:
        raise ResourceError(f"local disk full while fetching {model}",
                            hint="free space, then run again to resume") from None
    if transfer_error is not None:
        raise transfer_error
    progress(f"fetch {model}", total, total)
    problems, local = verify_files(names, listing, remote, staging, watcher, progress, model)
    return _Round(listing, names, local, problems, hasher)


def _fetch_over(t: SshTarget, cfg: "Config", model: str, plan: Plan, dest: Path, instance: dict, t0: float,
                *, log: logging.Logger, log_path: Path, progress: ProgressFn) -> dict:
    staging = staging_for(dest)
    seed(staging, dest)
    resumed = has_partials(staging)
    if resumed:
        log.info("partial data from an earlier attempt found in %s: resuming", staging)
    stats = RsyncStats()
    how: dict = {}
    refetched: list[str] = []
    for attempt in (1, 2):
        r = _one_round(t, cfg, model, plan, staging, how, stats, log=log, log_path=log_path, progress=progress)
        if not r.problems:
            break
        for p in r.problems:
            log.warning("%s (attempt %d)", p.text, attempt)
            remove_path(staging / p.name)     # so the quick check cannot keep a wrong copy
        if attempt == 2:
            more = f" (+{len(r.problems) - 1} more; see {log_path})" if len(r.problems) > 1 else ""
            raise FetchError(f"{model}: {r.problems[0].text} - still wrong after a re-fetch{more}",
                             hint="is training still writing to the run folder? wait for it to finish")
        refetched = [p.name for p in r.problems]
    seconds = max(time.monotonic() - t0, 1e-9)
    files = r.listing.files
    total = sum(files[n][0] for n in r.names)
    metadata = {
        "model": model,
        "source": plan.source,
        "source_kind": plan.kind,
        "instance": instance,
        "remote_path": r.listing.run_dir,
        "files": [{"name": n, "size": files[n][0], "sha256": r.local[n], "remote_mtime": files[n][1]}
                  for n in r.names],
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": how["tool"],
        "compression": "zstd" if how["zstd"] else "none",
        "verified_sha256": bool(cfg.vast.verify_sha256),
        "remote_hasher": r.hasher,
        "seconds": round(seconds, 3),
        "mib_per_s": round(total / 2**20 / seconds, 2),
        "bytes_total": total,
        "bytes_transferred": stats.bytes_received,
        "literal_bytes": stats.literal,
        "matched_bytes": stats.matched,
        "resumed_bytes": stats.resumed_bytes,
        "resumed": resumed,
        "refetched": refetched,
        "skipped_pickles": r.listing.pickles,
    }
    try:
        finalize(staging, dest, r.names, metadata)
    except OSError as exc:
        if exc.errno == 28:
            raise ResourceError(f"local disk full while saving the {model} adapter", hint="free space") from None
        raise
    log.info("fetched %s: %d files, %.1f MiB in %.2fs (%.1f MiB/s)", model, len(r.names), total / 2**20,
             seconds, metadata["mib_per_s"])
    return metadata
