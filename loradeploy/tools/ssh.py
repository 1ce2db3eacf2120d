"""One remote box over SSH: who and where (``SshTarget``), the options every ssh/rsync/scp call
shares, one shared connection, remote ``sh`` scripts, and ssh failures mapped to one-line errors.

Remote work is done by small POSIX ``sh`` scripts fed on stdin (``sh -s -- ARGS``), so nothing but
``sh``, ``stat``, ``ls`` and a hash tool is needed on the box, and the user's login shell only ever
parses one quoted command line. Every line the scripts print that we read starts with ``@@LD``, so
banners or shell-rc noise mixed into the output are ignored. The scripts themselves live in
``ssh_remote``; rsync and scp command lines in ``ssh_transfer``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ..errors import FetchError, LoradeployError, ProcError, ResourceError
from . import proc

MARK = "@@LD "
_SAFE_HOST = re.compile(r"^[A-Za-z0-9_.:%\[\]-]+$")
_SAFE_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
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


def install_hint(package: str) -> str:
    """How to install a system package here: Homebrew on macOS, apt-get elsewhere."""
    return f"brew install {package}" if sys.platform == "darwin" else f"apt-get install {package}"


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
            raise FetchError("ssh is not installed", hint=install_hint("openssh-client")) from None
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
