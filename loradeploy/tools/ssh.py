"""SSH, rsync and scp command lines for one remote box, and the remote probes that run over them.

Remote work is done by small POSIX ``sh`` scripts fed on stdin (``sh -s -- ARGS``), so nothing but
``sh``, ``stat``, ``ls`` and a hash tool is needed on the box, and the user's login shell only ever
parses one quoted command line. Every line the scripts print that we read starts with ``@@LD``, so
banners or shell-rc noise mixed into the output are ignored.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import FetchError, LoradeployError, ProcError, ResourceError
from . import proc

MARK = "@@LD "
PARTIAL_DIR = ".rsync-partial"
_SAFE_HOST = re.compile(r"^[A-Za-z0-9_.:%\[\]-]+$")
_SAFE_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
           "aes128-ctr", "aes192-ctr", "aes256-ctr")


@dataclass(frozen=True)
class SshTarget:
    host: str
    port: int = 22
    user: Optional[str] = None
    identity: Optional[Path] = None
    known_hosts: Optional[Path] = None
    host_key_policy: str = "strict"          # strict | accept-new
    connect_timeout_s: int = 15
    alive_interval_s: int = 15
    alive_count_max: int = 4
    control_path: Optional[str] = None       # set by shared_connection()

    def __post_init__(self):
        # Host and user land on command lines; refuse anything ssh could read as an option.
        if not self.host or self.host.startswith("-") or not _SAFE_HOST.match(self.host):
            raise FetchError(f"invalid SSH host {self.host!r}")
        if self.user is not None and not _SAFE_USER.match(self.user):
            raise FetchError(f"invalid SSH user {self.user!r}")
        for p in (self.identity, self.known_hosts):
            if p is not None and '"' in str(p):
                raise FetchError(f"path {p} contains a double quote, which ssh options cannot carry")

    @property
    def bare_host(self) -> str:
        return self.host.strip("[]")

    def describe(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.bare_host}:{self.port}"

    def spec(self, path: str) -> str:
        """``user@host:path`` as rsync and scp want it (IPv6 literals in brackets)."""
        h = self.bare_host
        h = f"[{h}]" if ":" in h else h
        return f"{self.user + '@' if self.user else ''}{h}:{path}"

    @property
    def is_loopback(self) -> bool:
        h = self.bare_host.lower()
        return h in ("localhost", "::1") or h.startswith("127.")


def ssh_options(t: SshTarget) -> list[str]:
    policy = "yes" if t.host_key_policy == "strict" else "accept-new"
    opts = [
        "-o", "BatchMode=yes",
        "-o", f"StrictHostKeyChecking={policy}",
        "-o", f"ConnectTimeout={t.connect_timeout_s}",
        "-o", f"ServerAliveInterval={t.alive_interval_s}",
        "-o", f"ServerAliveCountMax={t.alive_count_max}",
        # ERROR keeps every failure we classify but drops "Permanently added" chatter.
        "-o", "LogLevel=ERROR",
        # AES-GCM first: with AES-NI it costs about half the CPU of the default ChaCha20 per byte
        # on both ends (measured 0.25 vs 0.45 CPU-s per 300 MB); the rest keep old servers working.
        "-o", "Ciphers=" + ",".join(CIPHERS),
    ]
    if t.known_hosts is not None:
        # Quoted: ssh splits UserKnownHostsFile on spaces (it accepts several files).
        opts += ["-o", f'UserKnownHostsFile="{t.known_hosts}"', "-o", "GlobalKnownHostsFile=/dev/null"]
    if t.identity is not None:
        opts += ["-o", "IdentitiesOnly=yes", "-i", str(t.identity)]
    if t.control_path is not None:
        opts += ["-o", "ControlMaster=auto", "-o", f"ControlPath={t.control_path}",
                 "-o", f"ControlPersist={CONTROL_PERSIST_S}"]
    return opts + ["-p", str(t.port)]


def _login(t: SshTarget) -> str:
    return f"{t.user}@{t.bare_host}" if t.user else t.bare_host


def ssh_argv(t: SshTarget, remote_command: str) -> list[str]:
    return ["ssh", *ssh_options(t), "--", _login(t), remote_command]


# An idle master outlives us by this much at most, should we die without closing it.
CONTROL_PERSIST_S = 60


@contextlib.contextmanager
def shared_connection(t: SshTarget, log_path: Path | None = None) -> Iterator[SshTarget]:
    """One SSH connection for the probe, the remote hashing and the transfer (ControlMaster):
    the handshake, often the slowest part of a small fetch through vast's proxies, is paid once."""
    # sockaddr_un holds ~104 bytes: keep the socket path short, hence /tmp rather than $TMPDIR.
    folder = tempfile.mkdtemp(prefix="ld-ssh-", dir="/tmp" if os.path.isdir("/tmp") else None)
    shared = dataclasses.replace(t, control_path=os.path.join(folder, "m"))
    try:
        yield shared
    finally:
        if os.path.exists(shared.control_path):
            try:
                proc.run(["ssh", *ssh_options(shared), "-O", "exit", "--", _login(shared)], log_path=log_path,
                         timeout=15, check=False, what="ssh -O exit")
            except ProcError:
                pass
        shutil.rmtree(folder, ignore_errors=True)


def rsync_shell(t: SshTarget) -> str:
    """The ``-e`` value for rsync (rsync splits it honouring shell-style quotes)."""
    return shlex.join(["ssh", *ssh_options(t)])


def scp_argv(t: SshTarget, remote_path: str, local: Path, *, legacy: bool = False) -> list[str]:
    opts = [o if o != "-p" else "-P" for o in ssh_options(t)]
    if legacy:
        # Legacy scp hands the path to the remote shell; SFTP mode globs it instead.
        remote = shlex.quote(remote_path)
        return ["scp", "-O", "-p", "-q", *opts, "--", t.spec(remote), str(local)]
    remote = re.sub(r"([*?\[\]\\])", r"\\\1", remote_path)
    return ["scp", "-p", "-q", *opts, "--", t.spec(remote), str(local)]


# ----------------------------------------------------------------------------- error mapping

def classify_failure(output: str, t: SshTarget) -> LoradeployError | None:
    """Map ssh / rsync / scp output to a one-line error, or None when nothing is recognised."""
    where = t.describe()
    low = output.lower()
    if "no space left on device" in low:
        return ResourceError("local disk full while fetching from " + where,
                             hint="free space in the work folder, then run again to resume")
    if "remote host identification has changed" in low:
        return FetchError(f"host key of {where} has CHANGED and does not match "
                          f"{t.known_hosts or 'known_hosts'}",
                          hint="if the box was re-created, remove its old line with "
                               f"ssh-keygen -R '[{t.bare_host}]:{t.port}' -f KNOWN_HOSTS")
    if "host key is known" in low or ("host key verification failed" in low and "changed" not in low):
        return FetchError(f"host key of {where} is unknown and vast.host_key_policy is strict",
                          hint=f"add it: ssh-keyscan -p {t.port} {t.bare_host} >> "
                               f"{t.known_hosts or '~/.ssh/known_hosts'} (after checking it), "
                               "or set vast.host_key_policy: accept-new")
    if "connection refused" in low:
        return FetchError(f"cannot connect to {where}: connection refused",
                          hint="is the instance running and the SSH port right?")
    if "banner exchange" in low or ("connect to host" in low and "timed out" in low):
        return FetchError(f"connect timeout: no SSH answer from {where} within {t.connect_timeout_s}s",
                          hint="check the host/port, the instance state, or raise vast.connect_timeout_s")
    if "io timeout" in low or "not responding" in low or "timed out" in low:
        return FetchError(f"connection to {where} stalled and was dropped",
                          hint="run again: finished and partial files are kept and the transfer resumes")
    if "permission denied" in low and ("publickey" in low or "password" in low or "keyboard" in low):
        return FetchError(f"authentication failed for {where}",
                          hint="check vast.ssh_key and that its public key is on the instance")
    if "could not resolve hostname" in low or "name or service not known" in low:
        return FetchError(f"cannot resolve SSH host {t.bare_host!r}", hint="check the host name")
    if "identity file" in low and "not accessible" in low:
        return FetchError(f"SSH key {t.identity} is not readable", hint="check vast.ssh_key")
    if "no route to host" in low or "network is unreachable" in low:
        return FetchError(f"cannot reach {where}: no route to host")
    if ("connection closed" in low or "connection reset" in low or "broken pipe" in low
            or "connection unexpectedly closed" in low):
        return FetchError(f"connection to {where} was lost",
                          hint="run again: finished and partial files are kept and the transfer resumes")
    return None


def ssh_failed(output: str, t: SshTarget, what: str, rc: int | None) -> LoradeployError:
    err = classify_failure(output, t)
    if err is not None:
        return err
    last = [ln for ln in output.strip().splitlines() if not ln.startswith(MARK)][-1:] or [""]
    return FetchError(f"{what} on {t.describe()} failed (exit {rc}): {last[0][:200]}")


def run_remote(t: SshTarget, script: str, args: list[str], *, log_path: Path | None, timeout: float,
               what: str) -> tuple[int, str]:
    """Run a POSIX sh script on the box; return (exit code, output). Connection errors raise."""
    argv = ssh_argv(t, "sh -s -- " + shlex.join(args))
    try:
        res = proc.run(argv, log_path=log_path, timeout=timeout, check=False, what=what,
                       input_bytes=script.encode())
    except ProcError as exc:
        if exc.returncode == 127 and not exc.stderr_tail:
            raise FetchError("ssh is not installed", hint="apt-get install openssh-client") from None
        raise (classify_failure(exc.stderr_tail, t)
               or FetchError(f"{what} on {t.describe()} timed out after {timeout:.0f}s",
                             hint="check the connection, or raise vast.connect_timeout_s")) from None
    if res.returncode == 255:
        raise ssh_failed(res.stdout, t, what, res.returncode)
    return res.returncode, res.stdout


def marked(output: str) -> list[list[str]]:
    """The ``@@LD`` lines as [tag, rest] pairs."""
    out = []
    for line in output.splitlines():
        if line.startswith(MARK):
            tag, _, rest = line[len(MARK):].partition(" ")
            out.append([tag, rest])
    return out


# ----------------------------------------------------------------------------- probe: where and what

PROBE_SCRIPT = r'''
say() { printf '@@LD %s\n' "$*"; }
out=$1 run=$2 dir=$3
shift 3
if [ -z "$dir" ]; then
  if [ ! -d "$out" ]; then say ERR nooutdir "$out"; exit 0; fi
  if [ -n "$run" ]; then
    dir="$out/$run"
  else
    # newest folder that holds an adapter
    dir=$(ls -1td -- "$out"/*/ 2>/dev/null | while IFS= read -r d; do
            if [ -f "${d}adapter_config.json" ]; then printf '%s' "$d"; break; fi; done)
    if [ -z "$dir" ]; then say ERR norun "$out"; exit 0; fi
  fi
fi
if [ ! -d "$dir" ]; then say ERR nodir "$dir"; exit 0; fi
cd -P -- "$dir" 2>/dev/null || { say ERR noaccess "$dir"; exit 0; }
real=$(pwd -P)
say DIR "$real"
if command -v rsync >/dev/null 2>&1; then
  rsync --version 2>/dev/null | while IFS= read -r l; do say RV "$l"; done
fi
for n in "$@"; do
  if [ -L "$n" ]; then
    t=$(readlink -f -- "$n" 2>/dev/null)
    case "$t" in "$real"/*) ;; *) say LINKOUT "$n" "$t"; continue;; esac
  fi
  [ -e "$n" ] || continue
  if [ -f "$n" ]; then
    s=$(stat -L -c '%s %Y' -- "$n" 2>/dev/null) || { say UNREADABLE "$n"; continue; }
    say F "$s" "$n"
  else
    say NOTFILE "$n"
  fi
done
for n in adapter_model.bin pytorch_model.bin training_args.bin; do
  if [ -e "$n" ]; then say PICKLE "$n"; fi
done
exit 0
'''


@dataclass
class RemoteListing:
    run_dir: str
    files: dict[str, tuple[int, int]] = field(default_factory=dict)   # name -> (size, mtime s)
    rsync_version: Optional[tuple[int, ...]] = None
    rsync_compress: frozenset[str] = frozenset()
    links_outside: dict[str, str] = field(default_factory=dict)
    not_files: list[str] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)


def parse_rsync_version(lines: list[str]) -> tuple[Optional[tuple[int, ...]], frozenset[str]]:
    version = None
    compress: set[str] = set()
    for i, line in enumerate(lines):
        m = re.search(r"rsync\s+version\s+v?(\d+)\.(\d+)\.(\d+)", line)
        if m and version is None:
            version = tuple(int(x) for x in m.groups())
        if line.strip().lower().startswith("compress list") and i + 1 < len(lines):
            compress.update(lines[i + 1].split())
    return version, frozenset(compress)


def local_rsync_caps(log_path: Path | None = None) -> tuple[Optional[tuple[int, ...]], frozenset[str]]:
    try:
        res = proc.run(["rsync", "--version"], log_path=log_path, timeout=20, check=False)
    except ProcError:
        return None, frozenset()
    if res.returncode != 0:
        return None, frozenset()
    return parse_rsync_version(res.stdout.splitlines())


def probe(t: SshTarget, *, out_dir: str, run: str, run_dir: str, names: list[str],
          log_path: Path | None) -> RemoteListing:
    """Resolve the run folder on the box and stat the allowed files in it (no hashing yet)."""
    rc, out = run_remote(t, PROBE_SCRIPT, [out_dir, run, run_dir, *names], log_path=log_path,
                         timeout=t.connect_timeout_s + 60, what="remote listing")
    lines = marked(out)
    errors = {rest.partition(" ")[0]: rest.partition(" ")[2] for tag, rest in lines if tag == "ERR"}
    where = t.describe()
    if "nooutdir" in errors:
        raise FetchError(f"remote path missing: {errors['nooutdir']} does not exist on {where}",
                         hint="check vast.remote_output_dir")
    if "norun" in errors:
        raise FetchError(f"no run folder with adapter_config.json under {errors['norun']} on {where}",
                         hint="has training saved the adapter yet? set vast.run to pick one")
    if "nodir" in errors:
        raise FetchError(f"remote path missing: {errors['nodir']} does not exist on {where}",
                         hint="check the adapter path / vast.run")
    if "noaccess" in errors:
        raise FetchError(f"remote folder {errors['noaccess']} on {where} is not readable")
    dirs = [rest for tag, rest in lines if tag == "DIR"]
    if rc != 0 or not dirs:
        last = out.strip().splitlines()[-1:] or [""]
        raise FetchError(f"remote listing on {where} failed (exit {rc}): {last[0][:200]}",
                         hint="the box needs a POSIX sh, ls and stat")
    listing = RemoteListing(run_dir=dirs[0])
    listing.rsync_version, listing.rsync_compress = parse_rsync_version(
        [rest for tag, rest in lines if tag == "RV"])
    for tag, rest in lines:
        if tag == "F":
            size, mtime, name = rest.split(" ", 2)
            listing.files[name] = (int(size), int(mtime))
        elif tag == "LINKOUT":
            name, _, target = rest.partition(" ")
            listing.links_outside[name] = target
        elif tag in ("NOTFILE", "UNREADABLE"):
            listing.not_files.append(rest)
        elif tag == "PICKLE":
            listing.pickles.append(rest)
    return listing


# ----------------------------------------------------------------------------- remote hashes

HASH_SCRIPT = r'''
say() { printf '@@LD %s\n' "$*"; }
cd -P -- "$1" 2>/dev/null || { say ERR nodir "$1"; exit 0; }
shift
hasher=
for h in openssl sha256sum shasum python3; do
  if command -v "$h" >/dev/null 2>&1; then hasher=$h; break; fi
done
if [ -z "$hasher" ]; then say ERR nohasher; exit 0; fi
say HASHER "$hasher"
for n in "$@"; do
  a=$(stat -L -c '%s %Y' -- "$n" 2>/dev/null) || a="-1 -1"
  case $hasher in
    openssl) s=$(openssl dgst -sha256 -r "$n" 2>/dev/null) ;;
    sha256sum) s=$(sha256sum -- "$n" 2>/dev/null) ;;
    shasum) s=$(shasum -a 256 -- "$n" 2>/dev/null) ;;
    python3) s=$(python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$n" 2>/dev/null) ;;
  esac
  b=$(stat -L -c '%s %Y' -- "$n" 2>/dev/null) || b="-1 -1"
  s=${s%% *}
  say H "${s:--}" $a $b "$n"
done
exit 0
'''


@dataclass(frozen=True)
class RemoteHash:
    sha256: Optional[str]
    before: tuple[int, int]    # (size, mtime) just before hashing
    after: tuple[int, int]     # ... and just after: a difference means it changed under us


def remote_hashes(t: SshTarget, run_dir: str, names: list[str], *, log_path: Path | None,
                  timeout: float) -> tuple[str, dict[str, RemoteHash]]:
    """SHA-256 of each file computed on the box, with its stat before and after hashing."""
    rc, out = run_remote(t, HASH_SCRIPT, [run_dir, *names], log_path=log_path, timeout=timeout,
                         what="remote sha256")
    lines = marked(out)
    for tag, rest in lines:
        if tag == "ERR" and rest.startswith("nohasher"):
            raise FetchError(f"{t.describe()} has no sha256 tool (openssl, sha256sum, shasum or python3)",
                             hint="install coreutils on the box, or set vast.verify_sha256: false")
        if tag == "ERR":
            raise FetchError(f"remote path missing: {run_dir} vanished from {t.describe()}")
    hasher = next((rest for tag, rest in lines if tag == "HASHER"), "?")
    result: dict[str, RemoteHash] = {}
    for tag, rest in lines:
        if tag != "H":
            continue
        parts = rest.split(" ", 5)
        if len(parts) != 6:
            continue
        digest, s1, m1, s2, m2, name = parts
        digest = digest.lower()
        result[name] = RemoteHash(digest if _HEX64.match(digest) else None,
                                  (int(s1), int(m1)), (int(s2), int(m2)))
    missing = [n for n in names if n not in result]
    if rc != 0 or missing:
        raise FetchError(f"remote sha256 on {t.describe()} gave no answer for {', '.join(missing) or 'files'} "
                         f"(exit {rc})")
    return hasher, result


# ----------------------------------------------------------------------------- rsync stats

@dataclass
class RsyncStats:
    bytes_received: int = 0
    bytes_sent: int = 0
    literal: int = 0
    matched: int = 0
    resumed_bytes: int = 0

    def add(self, other: "RsyncStats") -> None:
        self.bytes_received += other.bytes_received
        self.bytes_sent += other.bytes_sent
        self.literal += other.literal
        self.matched += other.matched


def parse_rsync_stats(output: str) -> RsyncStats:
    def num(label: str) -> int:
        m = re.search(rf"^{label}:\s*([\d,.]+)", output, re.M)
        return int(m.group(1).replace(",", "").replace(".", "")) if m else 0
    return RsyncStats(num("Total bytes received"), num("Total bytes sent"),
                      num("Literal data"), num("Matched data"))


def rsync_argv(t: SshTarget, run_dir: str, files_from: Path, dest: Path, *, compress: bool,
               io_timeout: int, append: bool = False) -> list[str]:
    """rsync from the run folder into ``dest``.

    ``append`` is for resuming: files in ``dest`` are prefixes kept from an interrupted transfer
    and get the rest appended, then rsync checks the whole file (--append-verify) and re-sends it
    if that fails. Far cheaper than the delta algorithm against a partial basis, which rolls a
    checksum over every byte it has not got (measured ~3x slower than starting over). Only used on
    a folder that holds nothing but such prefixes, never on finished files.
    """
    args = [
        "rsync",
        "-s",                          # remote path goes over the protocol, not through a shell
        "-t",                          # keep mtimes: the quick check then skips finished files on resume
        "--copy-links",                # in-folder links only; the probe refused any leading outside
        f"--files-from={files_from}",
        f"--timeout={io_timeout}",
        "--stats",
        "--out-format=%i %n %l",
        "-e", rsync_shell(t),
    ]
    if append:
        args += ["--inplace", "--append-verify"]
    else:
        # Interrupted files wait in the partial folder, never over a finished one. Whole files:
        # a changed file shares nothing with its old version (new weights), and rolling the
        # delta checksum over it costs more than sending it.
        args += [f"--partial-dir={PARTIAL_DIR}", "--whole-file"]
    if compress:
        args += ["--compress", "--compress-choice=zstd"]
    return args + [t.spec(run_dir.rstrip("/") + "/"), str(dest) + "/"]


def run_transfer(argv: list[str], t: SshTarget, *, log_path: Path | None, timeout: float, what: str,
                 check: bool = True, on_line: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run rsync/scp; with ``check`` map a failure to a one-line FetchError / ResourceError."""
    try:
        res = proc.run(argv, log_path=log_path, timeout=timeout, check=False, what=what, on_line=on_line)
    except ProcError as exc:
        if exc.returncode == 127 and "command not found" in exc.message:
            raise FetchError(f"{argv[0]} is not installed locally", hint=f"apt-get install {argv[0]}") from None
        raise FetchError(f"{what} from {t.describe()} timed out after {timeout:.0f}s",
                         hint="raise vast.fetch_timeout_s; run again to resume") from None
    if check and res.returncode != 0:
        raise ssh_failed(res.stdout, t, what, res.returncode)
    return res.returncode, res.stdout
