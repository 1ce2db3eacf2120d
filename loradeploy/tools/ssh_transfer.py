"""rsync and scp from one remote box: their command lines, rsync's capabilities and statistics,
and running a transfer with its failure mapped to a one-line error."""
from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import FetchError, ProcError
from ..tally import Tally
from . import proc
from .ssh import SshTarget, install_hint, ssh_failed, ssh_options

PARTIAL_DIR = ".rsync-partial"


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


# ----------------------------------------------------------------------------- rsync capabilities

MIN_RSYNC = (3, 0, 0)    # -s (--protect-args) and --append-verify came with 3.0
# Homebrew's rsync (Apple Silicon, then Intel): macOS's own is 2.6.9, or openrsync from 15.4 on
HOMEBREW_RSYNC = ("/opt/homebrew/bin/rsync", "/usr/local/bin/rsync")


def parse_rsync_version(lines: list[str]) -> tuple[Optional[tuple[int, ...]], frozenset[str]]:
    """(version, compress list) from ``rsync --version``. openrsync prints "openrsync: protocol version
    29" and then "rsync version 2.6.9 compatible": the version it reads is that 2.6.9."""
    version = None
    compress: set[str] = set()
    for i, line in enumerate(lines):
        m = re.search(r"rsync\s+version\s+v?(\d+)\.(\d+)\.(\d+)", line)
        if m and version is None:
            version = tuple(int(x) for x in m.groups())
        if line.strip().lower().startswith("compress list") and i + 1 < len(lines):
            compress.update(lines[i + 1].split())
    return version, frozenset(compress)


def rsync_usable(version: Optional[tuple[int, ...]]) -> bool:
    return version is not None and version >= MIN_RSYNC


@dataclass(frozen=True)
class LocalRsync:
    """The rsync this machine runs: ``path`` None when there is none of version >= 3; ``rejected``
    names each one found too old ("/usr/bin/rsync (openrsync)")."""

    path: Optional[str]
    version: Optional[tuple[int, ...]] = None
    compress: frozenset[str] = frozenset()
    rejected: tuple[str, ...] = ()


def local_rsync(log_path: Path | None = None) -> LocalRsync:
    """PATH's rsync when it is >= 3, else Homebrew's."""
    rejected: list[str] = []
    seen: set[str] = set()
    for path in (shutil.which("rsync"), *HOMEBREW_RSYNC):
        if not path or not os.access(path, os.X_OK) or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        try:
            res = proc.run([path, "--version"], log_path=log_path, timeout=20, check=False)
        except ProcError:
            continue
        lines = res.stdout.splitlines()
        version, compress = parse_rsync_version(lines) if res.returncode == 0 else (None, frozenset())
        if rsync_usable(version):
            return LocalRsync(path, version, compress, tuple(rejected))
        what = "openrsync" if any("openrsync" in ln for ln in lines) else \
            f"version {'.'.join(map(str, version))}" if version else "no version"
        rejected.append(f"{path} ({what})")
    return LocalRsync(None, rejected=tuple(rejected))


# ----------------------------------------------------------------------------- rsync stats

@dataclass
class RsyncStats(Tally):
    """What rsync's --stats said, summed over a fetch's rounds (``add``); resumed_bytes, what partial
    files already held, is counted by the caller (rsync's own output leaves it 0)."""

    bytes_received: int = 0
    bytes_sent: int = 0
    literal: int = 0
    matched: int = 0
    resumed_bytes: int = 0


def parse_rsync_stats(output: str) -> RsyncStats:
    def num(label: str) -> int:
        m = re.search(rf"^{label}:\s*([\d,.]+)", output, re.M)
        return int(m.group(1).replace(",", "").replace(".", "")) if m else 0
    return RsyncStats(num("Total bytes received"), num("Total bytes sent"),
                      num("Literal data"), num("Matched data"))


def rsync_argv(t: SshTarget, run_dir: str, files_from: Path, dest: Path, *, compress: bool,
               io_timeout: int, append: bool = False, rsync: str = "rsync") -> list[str]:
    """rsync from the run folder into ``dest``.

    ``append`` is for resuming: files in ``dest`` are prefixes kept from an interrupted transfer
    and get the rest appended, then rsync checks the whole file (--append-verify) and re-sends it
    if that fails. Far cheaper than the delta algorithm against a partial basis, which rolls a
    checksum over every byte it has not got (measured ~3x slower than starting over). Only used on
    a folder that holds nothing but such prefixes, never on finished files.
    """
    args = [
        rsync,
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
            name = Path(argv[0]).name
            raise FetchError(f"{name} is not installed locally", hint=install_hint(name)) from None
        raise FetchError(f"{what} from {t.describe()} timed out after {timeout:.0f}s",
                         hint="raise vast.fetch_timeout_s; run again to resume") from None
    if check and res.returncode != 0:
        raise ssh_failed(res.stdout, t, what, res.returncode)
    return res.returncode, res.stdout
