"""Fetch stage: bring a LoRA adapter from the training box into the work folder, verified.

Remote sources (``ssh://`` or a vast.ai instance) go through system rsync over ssh (one shared
SSH connection for listing, hashing and transfer) into a staging folder beside the adapter folder
(``.adapter.incoming``). The staging folder survives failures, so a re-run resumes: finished files
pass rsync's quick check, and the prefix of an interrupted file (kept by rsync in ``.rsync-partial``)
gets only the rest appended (``--append-verify``). Only after every file matches the SHA-256
computed on the box is ``metadata.json`` written and the staging folder swapped in as the adapter
folder. Without rsync on either end, scp does the same job file by file (no resume inside a file).

Integrity: the box hashes its files live (``openssl``/``sha256sum``/``shasum``/``python3``, whichever
it has), concurrently with the transfer, and reports each file's size and mtime before and after
hashing. A file is accepted only when the listing, both remote stats and the received copy agree on
size and mtime and the hashes match; so a remote file rewritten after it was listed is caught whether
the rewrite landed before, during or after its transfer. A mismatch re-fetches once, then fails with
both hashes. (A manifest written by the training job was not used: it can be stale, and hashing on
the box costs a fraction of the transfer.)

Local hashing overlaps the transfer too: rsync writes each file front to back into a temp name and
renames it into place, so a watcher thread reads the temp file as it grows; when the final name has
the same inode and all bytes are read, that digest stands. Anything the watcher missed is hashed
after the transfer, and any mismatch is re-hashed from disk before it counts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..config import AdapterSource
from ..errors import FetchError, InputError, LoradeployError, ResourceError
from ..fsutil import atomic_write_text, free_bytes, fsync_path, remove_path, sha256_file
from ..tools import ssh as sshmod
from ..tools.ssh import PARTIAL_DIR, RemoteHash, RemoteListing, SshTarget
from .base import Artifact, ModelPaths, ProgressFn, StageContext, StageResult, no_progress

if TYPE_CHECKING:
    from ..config import Config

REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
OPTIONAL = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "training_args.json", "trainer_state.json", "all_results.json", "train_results.json",
    "eval_results.json", "metrics.json",
)
ALLOWED = REQUIRED + OPTIONAL
PICKLE_WEIGHTS = ("adapter_model.bin", "pytorch_model.bin")
METADATA = "metadata.json"
SCP_PARTIAL = ".scp-partial"
RESUME_DIR = ".resume"          # prefixes of interrupted files, completed by appending
_RUN_NAME = re.compile(r"^[A-Za-z0-9_@+=,.:-][A-Za-z0-9_@+=,.: -]{0,200}$")
SYNC_EVERY = 64 << 20
_RSYNC_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9]{6}$")


# ----------------------------------------------------------------------------- where from

@dataclass(frozen=True)
class Plan:
    kind: str                         # local | ssh | vast
    source: str                       # describe() of the adapter source
    path: str = ""                    # local folder, or remote run folder ('' = choose under out_dir)
    host: Optional[str] = None
    port: int = 22
    user: Optional[str] = None
    instance_id: Optional[int] = None  # resolved through the vast.ai API at run time
    out_dir: str = ""
    run: str = ""

    def inputs(self) -> dict[str, Any]:
        d = {"kind": self.kind, "source": self.source, "path": self.path}
        if self.kind != "local":
            d.update(host=self.host, port=self.port, user=self.user, instance_id=self.instance_id,
                     out_dir=self.out_dir, run=self.run, files=list(ALLOWED))
        return d


def _check_run_name(run: str) -> str:
    if run and (not _RUN_NAME.match(run) or run in (".", "..")):
        raise FetchError(f"invalid run folder name {run!r}", hint="a plain folder name under vast.remote_output_dir")
    return run


def _check_remote_path(path: str) -> str:
    if not path.startswith("/") or ".." in path.split("/") or "\n" in path or "\0" in path:
        raise FetchError(f"invalid remote adapter path {path!r}", hint="an absolute path without '..'")
    return posixpath.normpath(path)


def plan_for(cfg: "Config", model_name: str, instance_id: int | str | None = None) -> Plan:
    """Where the model's adapter comes from (no network access)."""
    m = cfg.model(model_name)
    src: AdapterSource = m.adapter_source
    v = cfg.vast
    if instance_id is not None and str(instance_id).strip() != "":
        run = src.path if src.kind == "vast" else ""
        src = AdapterSource("vast", run, instance=str(instance_id).strip())
    if src.kind == "local":
        return Plan("local", src.describe(), path=src.path)
    if src.kind == "ssh":
        return Plan("ssh", src.describe(), path=_check_remote_path(src.path), host=src.host,
                    port=src.port, user=src.user or v.ssh_user)
    run = _check_run_name(src.path or v.run or "")
    described = AdapterSource("vast", run, instance=src.instance).describe()
    named = v.instances.get(src.instance or "")
    if named is not None and named.host:
        return Plan("vast", described, host=named.host, port=named.port, user=named.user or v.ssh_user,
                    out_dir=v.remote_output_dir, run=run)
    iid = named.instance_id if named is not None else src.instance
    try:
        iid = int(str(iid))
    except ValueError:
        raise FetchError(f"vast instance {src.instance!r} is neither an id nor a name under vast.instances") from None
    return Plan("vast", described, instance_id=iid, user=(named.user if named else None) or v.ssh_user,
                out_dir=v.remote_output_dir, run=run)


def _target(cfg: "Config", host: str, port: int, user: Optional[str]) -> SshTarget:
    v = cfg.vast
    known = Path(v.known_hosts) if v.known_hosts else Path(cfg.pipeline.state_dir) / "known_hosts"
    known.parent.mkdir(parents=True, exist_ok=True)
    if v.ssh_key is not None and not Path(v.ssh_key).is_file():
        raise FetchError(f"SSH key {v.ssh_key} not found", hint="check vast.ssh_key")
    return SshTarget(host=host, port=port, user=user, identity=v.ssh_key, known_hosts=known,
                     host_key_policy=v.host_key_policy, connect_timeout_s=v.connect_timeout_s,
                     alive_interval_s=v.server_alive_interval_s, alive_count_max=v.server_alive_count_max)


# ----------------------------------------------------------------------------- local source

def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def validate_local(folder: Path) -> list[Path]:
    """Check a local adapter folder in place; return the files the pipeline will read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"adapter folder {folder} not found", hint="check the model's adapter path")
    root = folder.resolve()
    files = []
    for name in ALLOWED:
        p = folder / name
        if p.is_symlink() and not _inside(p, root):
            raise FetchError(f"refusing {p}: symlink leads outside the adapter folder ({os.path.realpath(p)})")
        if p.exists():
            if not p.is_file():
                raise InputError(f"{p} is not a regular file")
            files.append(p)
    missing = [n for n in REQUIRED if not (folder / n).is_file()]
    if "adapter_model.safetensors" in missing and any((folder / b).exists() for b in PICKLE_WEIGHTS):
        raise FetchError(f"refusing pickle weights in {folder} (adapter_model.bin): they can run code when loaded",
                         hint="save the adapter with safe_serialization=True (adapter_model.safetensors)")
    if missing:
        raise InputError(f"adapter folder {folder} lacks {', '.join(missing)}")
    return files


# ----------------------------------------------------------------------------- watching the receiver

@dataclass
class _Tail:
    f: Any
    ino: int
    h: Any = field(default_factory=hashlib.sha256)
    offset: int = 0
    synced: int = 0


class _Watcher:
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

    def __enter__(self) -> "_Watcher":
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
                os.fdatasync(fd)
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


# ----------------------------------------------------------------------------- remote fetch

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


def _complete(path: Path, size: int, mtime: int) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return path.is_file() and st.st_size == size and int(st.st_mtime) == mtime


def _seed(staging: Path, dest: Path) -> None:
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


def _check_listing(listing: RemoteListing, t: SshTarget, log: logging.Logger) -> list[str]:
    where = f"{t.describe()}:{listing.run_dir}"
    for name, target in listing.links_outside.items():
        raise FetchError(f"refusing {name} at {where}: symlink leads outside the run folder ({target})")
    bad = [n for n in listing.not_files if n in REQUIRED]
    if bad:
        raise FetchError(f"{bad[0]} at {where} is not a regular readable file")
    missing = [n for n in REQUIRED if n not in listing.files]
    if "adapter_model.safetensors" in missing and any(p in PICKLE_WEIGHTS for p in listing.pickles):
        raise FetchError(f"refusing pickle weights adapter_model.bin at {where}: they can run code when loaded",
                         hint="save the adapter with safe_serialization=True (adapter_model.safetensors)")
    if missing:
        raise FetchError(f"remote path {where} has no {', '.join(missing)}",
                         hint="point the adapter at the folder holding adapter_config.json")
    if listing.pickles:
        log.info("not fetching pickle files %s", ", ".join(listing.pickles))
    return [n for n in ALLOWED if n in listing.files]


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


def _check_disk(cfg: "Config", model: str, staging: Path, listing: RemoteListing, names: list[str]) -> None:
    need = sum(listing.files[n][0] - _prefix_size(staging, n, listing.files[n][0])
               for n in names if not _complete(staging / n, *listing.files[n]))
    floor = int(cfg.performance.min_free_disk_gb * (1 << 30))
    free = free_bytes(staging)
    if free - need < floor:
        raise ResourceError(
            f"not enough disk for the {model} adapter: need {need / 2**20:.1f} MiB and "
            f"{cfg.performance.min_free_disk_gb:g} GiB kept free, {free / 2**20:.1f} MiB free at {staging.parent}",
            hint="free space, or lower performance.min_free_disk_gb")


def _choose_tool(cfg: "Config", listing: RemoteListing, log: logging.Logger, log_path: Path,
                 t: SshTarget) -> tuple[str, bool]:
    """(tool, zstd): rsync when both ends have it, else scp."""
    want = cfg.vast.transfer
    local_ver, local_z = sshmod.local_rsync_caps(log_path)
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


def _collect_partials(staging: Path, listing: RemoteListing, names: list[str]) -> list[str]:
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
        if not 0 < best.stat().st_size < size or _complete(staging / name, size, mtime):
            best.unlink()
            continue
        rdir.mkdir(exist_ok=True)
        if best != rdir / name:
            os.replace(best, rdir / name)
        found.append(name)
    return found


def _rsync_once(t: SshTarget, run_dir: str, names: list[str], dest: Path, *, zstd: bool, append: bool,
                cfg: "Config", log_path: Path) -> sshmod.RsyncStats:
    files_from = dest / ".files-from"
    files_from.write_text("".join(n + "\n" for n in names))
    v = cfg.vast
    io_timeout = max(60, 4 * v.connect_timeout_s, v.server_alive_interval_s * v.server_alive_count_max)
    argv = sshmod.rsync_argv(t, run_dir, files_from, dest, compress=zstd, io_timeout=io_timeout, append=append)
    try:
        _, out = sshmod.run_transfer(argv, t, log_path=log_path, timeout=v.fetch_timeout_s, what="rsync")
    finally:
        files_from.unlink(missing_ok=True)
    return sshmod.parse_rsync_stats(out)


def _transfer_rsync(t: SshTarget, listing: RemoteListing, names: list[str], staging: Path,
                    report: Callable[[int], None], stats: sshmod.RsyncStats, *, zstd: bool, cfg: "Config",
                    log_path: Path, log: logging.Logger) -> _Watcher:
    expected = {n: listing.files[n][0] for n in names}
    resumable = _collect_partials(staging, listing, names)
    if resumable:
        rdir = staging / RESUME_DIR
        have = sum((rdir / n).stat().st_size for n in resumable)
        log.info("resuming %s: %.1f MiB already here", ", ".join(resumable), have / 2**20)
        stats.resumed_bytes += have
        with _Watcher(staging, expected, report, mode="append"):
            stats.add(_rsync_once(t, listing.run_dir, resumable, rdir, zstd=zstd, append=True, cfg=cfg,
                                  log_path=log_path))
        for n in resumable:
            os.replace(rdir / n, staging / n)
    with _Watcher(staging, expected, report, mode="rsync") as watcher:
        stats.add(_rsync_once(t, listing.run_dir, names, staging, zstd=zstd, append=False, cfg=cfg,
                              log_path=log_path))
    return watcher


def _transfer_scp(t: SshTarget, listing: RemoteListing, names: list[str], staging: Path,
                  report: Callable[[int], None], stats: sshmod.RsyncStats, *, zstd: bool, cfg: "Config",
                  log_path: Path, log: logging.Logger) -> _Watcher:
    part = staging / SCP_PARTIAL
    part.mkdir(exist_ok=True)
    legacy = False
    with _Watcher(staging, {n: listing.files[n][0] for n in names}, report, mode="scp") as watcher:
        for name in names:
            size, mtime = listing.files[name]
            final = staging / name
            if _complete(final, size, mtime):
                continue
            tmp = part / name
            remote = f"{listing.run_dir.rstrip('/')}/{name}"
            for _ in range(2):
                argv = sshmod.scp_argv(t, remote, tmp, legacy=legacy)
                rc, out = sshmod.run_transfer(argv, t, log_path=log_path, timeout=cfg.vast.fetch_timeout_s,
                                              what="scp", check=False)
                if rc != 0 and not legacy and "subsystem request failed" in out.lower():
                    log.warning("remote has no SFTP subsystem: retrying with legacy scp")
                    legacy = True
                    continue
                if rc != 0:
                    raise sshmod.ssh_failed(out, t, "scp", rc)
                break
            else:
                raise FetchError(f"scp from {t.describe()} failed in both SFTP and legacy mode")
            os.replace(tmp, final)
            stats.bytes_received += size
            stats.literal += size
    return watcher


def _counter(desc: str, start: int, total: int, progress: ProgressFn) -> Callable[[int], None]:
    state = [start]

    def add(n: int) -> None:
        state[0] += n
        progress(desc, state[0], total)
    return add


@dataclass
class _Problem:
    name: str
    text: str


def _verify(names: list[str], listing: RemoteListing, remote: dict[str, RemoteHash], staging: Path,
            watcher: _Watcher, progress: Callable[[str, float, float], None], model: str
            ) -> tuple[list[_Problem], dict[str, str]]:
    problems: list[_Problem] = []
    local: dict[str, str] = {}
    total = sum(listing.files[n][0] for n in names)
    done = 0
    for name in names:
        path = staging / name
        lsize, lmtime = listing.files[name]
        if not path.is_file():
            problems.append(_Problem(name, f"{name} was not received"))
            continue
        digest = watcher.digest_for(path, name)
        if digest is None:
            digest = sha256_file(path, progress=_counter(f"verify {model}", done, total, progress))
        local[name] = digest
        done += lsize
        st = path.stat()
        rh = remote.get(name)
        if rh is not None and (rh.before != (lsize, lmtime) or rh.after != rh.before):
            problems.append(_Problem(name, f"remote {name} changed after it was listed "
                                           f"(size/mtime {lsize}/{lmtime} -> {rh.after[0]}/{rh.after[1]}; "
                                           f"remote sha256 {rh.sha256}, local {digest})"))
            continue
        if (st.st_size, int(st.st_mtime)) != (lsize, lmtime):
            problems.append(_Problem(name, f"remote {name} changed after it was listed: listed {lsize} bytes "
                                           f"mtime {lmtime}, received {st.st_size} bytes mtime {int(st.st_mtime)}"))
            continue
        if rh is not None and rh.sha256 != digest:
            digest = local[name] = sha256_file(path)     # a watcher slip must never fail a good file
            if rh.sha256 != digest:
                problems.append(_Problem(name, f"sha256 mismatch for {name}: remote {rh.sha256}, local {digest}"))
    return problems, local


def _finalize(staging: Path, dest: Path, names: list[str], metadata: dict) -> None:
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


def fetch_remote(cfg: "Config", model: str, plan: Plan, dest: Path, *, log: logging.Logger,
                 log_path: Path, progress: ProgressFn = no_progress) -> dict:
    """Fetch a remote adapter into ``dest`` (a folder); return its metadata."""
    from ..tools.vastai import resolve_instance

    v = cfg.vast
    t0 = time.monotonic()
    host, port, instance = plan.host, plan.port, {}
    if plan.instance_id is not None:
        ep = resolve_instance(plan.instance_id, api_key=v.api_key, api_url=v.api_url,
                              timeout=v.connect_timeout_s + 15)
        host, port = ep.host, ep.port
        instance = {"id": ep.instance_id, "direct": ep.direct}
        log.info("vast.ai instance %s is at %s:%s (%s)", ep.instance_id, host, port, "direct" if ep.direct else "proxy")
    t = _target(cfg, host, port, plan.user)
    instance.update(host=t.bare_host, port=t.port, user=t.user)
    with sshmod.shared_connection(t, log_path) as shared:
        return _fetch_over(shared, cfg, model, plan, Path(dest), instance, t0, log=log, log_path=log_path,
                           progress=progress)


@dataclass
class _Round:
    listing: RemoteListing
    names: list[str]
    local: dict[str, str]
    problems: list[_Problem]
    hasher: Optional[str]


def _one_round(t: SshTarget, cfg: "Config", model: str, plan: Plan, staging: Path, how: dict,
               stats: sshmod.RsyncStats, *, log: logging.Logger, log_path: Path, progress: ProgressFn) -> _Round:
    """List, then transfer while the box hashes, then verify."""
    v = cfg.vast
    listing = sshmod.probe(t, out_dir=plan.out_dir, run=plan.run, run_dir=plan.path,
                           names=list(ALLOWED), log_path=log_path)
    names = _check_listing(listing, t, log)
    if not how:
        how["tool"], how["zstd"] = _choose_tool(cfg, listing, log, log_path, t)
        log.info("fetching %s from %s:%s with %s%s", model, t.describe(), listing.run_dir, how["tool"],
                 " (zstd)" if how["zstd"] else "")
    _check_disk(cfg, model, staging, listing, names)
    expected = {n: listing.files[n][0] for n in names}
    total = sum(expected.values())
    hash_job = None
    if v.verify_sha256:
        hash_job = _Background(lambda: sshmod.remote_hashes(t, listing.run_dir, names, log_path=log_path,
                                                            timeout=v.fetch_timeout_s))
    transfer_error: BaseException | None = None
    report = lambda done: progress(f"fetch {model}", done, total)  # noqa: E731
    try:
        move = _transfer_rsync if how["tool"] == "rsync" else _transfer_scp
        watcher = move(t, listing, names, staging, report, stats, zstd=how["zstd"], cfg=cfg, log_path=log_path,
                       log=log)
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
    problems, local = _verify(names, listing, remote, staging, watcher, progress, model)
    return _Round(listing, names, local, problems, hasher)


def _fetch_over(t: SshTarget, cfg: "Config", model: str, plan: Plan, dest: Path, instance: dict, t0: float,
                *, log: logging.Logger, log_path: Path, progress: ProgressFn) -> dict:
    staging = dest.parent / f".{dest.name}.incoming"
    _seed(staging, dest)
    resumed = any((staging / d).is_dir() and any((staging / d).iterdir())
                  for d in (PARTIAL_DIR, RESUME_DIR, SCP_PARTIAL))
    if resumed:
        log.info("partial data from an earlier attempt found in %s: resuming", staging)
    stats = sshmod.RsyncStats()
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
        _finalize(staging, dest, r.names, metadata)
    except OSError as exc:
        if exc.errno == 28:
            raise ResourceError(f"local disk full while saving the {model} adapter", hint="free space") from None
        raise
    log.info("fetched %s: %d files, %.1f MiB in %.2fs (%.1f MiB/s)", model, len(r.names), total / 2**20,
             seconds, metadata["mib_per_s"])
    return metadata


# ----------------------------------------------------------------------------- stage + library API

def _adapter_artifacts(folder: Path, files: list[dict] | None) -> list[Artifact]:
    arts = [Artifact.of(folder / f["name"], "adapter", sha256=f["sha256"]) for f in files or []]
    return arts + [Artifact.of(folder / METADATA, "metadata")]


class FetchStage:
    name = "fetch"

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        plan = plan_for(ctx.cfg, ctx.model_name, ctx.options.get("instance_id"))
        d = plan.inputs()
        if plan.kind != "local":
            d.update(verify_sha256=ctx.cfg.vast.verify_sha256, host_key_policy=ctx.cfg.vast.host_key_policy)
        return d

    def run(self, ctx: StageContext) -> StageResult:
        plan = plan_for(ctx.cfg, ctx.model_name, ctx.options.get("instance_id"))
        if plan.kind == "local":
            files = validate_local(Path(plan.path))
            return StageResult([Artifact.of(p, "adapter") for p in files],
                               {"source": "local", "adapter_dir": plan.path})
        meta = fetch_remote(ctx.cfg, ctx.model_name, plan, ctx.paths.adapter, log=ctx.log,
                            log_path=ctx.log_path, progress=ctx.progress)
        info = {k: meta[k] for k in ("tool", "compression", "remote_path", "seconds", "mib_per_s",
                                     "bytes_transferred", "resumed", "refetched")}
        info.update(source=plan.kind, adapter_dir=str(ctx.paths.adapter))
        return StageResult(_adapter_artifacts(ctx.paths.adapter, meta["files"]), info)


def default_paths(cfg: "Config", model_name: str) -> ModelPaths:
    m = cfg.model(model_name)
    return ModelPaths(Path(cfg.pipeline.work_dir) / model_name, model_name, m.version)


def fetch_adapter(cfg: "Config", model_name: str, *, instance_id: int | str | None = None,
                  dest: Path | None = None, progress: ProgressFn | None = None,
                  log: logging.Logger | None = None, log_path: Path | None = None) -> dict:
    """Fetch one model's adapter (``loradeploy fetch``); return its metadata.

    A local adapter is only validated; the returned dict then says ``source_kind: local`` and
    lists its files, and nothing is written.
    """
    log = log or logging.getLogger(f"loradeploy.fetch.{model_name}")
    log_path = log_path or Path(cfg.logging.log_dir) / model_name / "fetch.log"
    plan = plan_for(cfg, model_name, instance_id)
    if plan.kind == "local":
        files = validate_local(Path(plan.path))
        return {"model": model_name, "source": plan.source, "source_kind": "local", "adapter_dir": plan.path,
                "files": [{"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)} for p in files]}
    dest = Path(dest) if dest is not None else default_paths(cfg, model_name).adapter
    return fetch_remote(cfg, model_name, plan, dest, log=log, log_path=log_path, progress=progress or no_progress)


def fetch_many(cfg: "Config", names: list[str], *, instance_id: int | str | None = None,
               progress: ProgressFn | None = None, log: logging.Logger | None = None) -> dict[str, dict]:
    """Fetch several adapters, ``performance.parallel_downloads`` at a time.

    Every fetch runs to its end; if any failed, a FetchError naming each failure is raised after
    the others finished, with the successful metadata on its ``results`` attribute.
    """
    results: dict[str, dict] = {}
    errors: dict[str, LoradeployError] = {}
    workers = max(1, min(len(names), cfg.performance.parallel_downloads))

    def one(name: str) -> None:
        try:
            results[name] = fetch_adapter(cfg, name, instance_id=instance_id, progress=progress,
                                          log=(log.getChild(name) if log else None))
        except LoradeployError as exc:
            errors[name] = exc

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch") as pool:
        list(pool.map(one, names))
    if errors:
        first = next(iter(errors.values()))
        err_cls = ResourceError if all(isinstance(e, ResourceError) for e in errors.values()) else FetchError
        detail = "; ".join(f"{n}: {e.one_line()}" for n, e in errors.items())
        err = err_cls(f"{len(errors)} of {len(names)} fetches failed: {detail}", hint=first.hint)
        err.results = results  # type: ignore[attr-defined]
        raise err
    return results
