"""A real sshd on 127.0.0.1 serving a folder laid out like a vast.ai instance, for tests and benchmarks.

The remote path is a local absolute path, since it is loopback: ``server.output_dir`` plays
``/workspace/output``. Every login runs through a forced-command wrapper that sets PATH from
``remote_path`` in the server folder, so a test can take tools away from (or slip wrappers into)
the "remote box" without restarting sshd. Started through tools.proc like every other process.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..tools.proc import Spawned, alive, run, spawn, stop

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
# Ahead of the system's tools on the "remote box", as on a Mac with Homebrew: macOS's own rsync
# (2.6.9 / openrsync) is too old for the fetch, Homebrew's is not. /usr/local/bin is Intel Homebrew's.
HOMEBREW_BIN = ("/opt/homebrew/bin", "/usr/local/bin")
SFTP_SERVER = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                                "/usr/libexec/sftp-server") if os.path.exists(p)), "internal-sftp")


def throttled_rsync(kib_per_s: int) -> str:
    """A "remote box" rsync (for restrict_tools' ``add``) that sends at most ``kib_per_s``: the
    rsync this machine's fetch runs (>= 3; Homebrew's on a Mac), with --bwlimit."""
    from ..tools.ssh_transfer import local_rsync

    return f'#!/bin/sh\nexec "{local_rsync().path or "rsync"}" --bwlimit={kib_per_s} "$@"\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str = "loradeploy-test") -> str:
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class SshServer:
    dir: Path
    port: int
    host_key_pub: str
    client_key: Path
    user: str
    proc: Optional[Spawned] = None
    log: Path = field(init=False)

    def __post_init__(self):
        self.log = self.dir / "sshd.log"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def output_dir(self) -> Path:
        """Plays vast.ai's /workspace/output."""
        return self.dir / "box" / "workspace" / "output"

    def known_hosts_line(self, key: str | None = None) -> str:
        # ssh writes a non-22 port as [host]:port
        return f"[{self.host}]:{self.port} {' '.join((key or self.host_key_pub).split()[:2])}\n"

    def write_known_hosts(self, path: Path, key: str | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.known_hosts_line(key))
        return path

    def url(self, path: Path | str) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}{path}"

    def set_remote_path(self, value: str | None) -> None:
        f = self.dir / "remote_path"
        if value is None:
            f.unlink(missing_ok=True)
        else:
            f.write_text(value)

    def restrict_tools(self, drop: tuple[str, ...] = (), add: dict[str, str] | None = None) -> Path:
        """Give remote logins a PATH of the system's tools minus ``drop``, plus ``add`` scripts."""
        bin_dir = self.dir / f"bin-{time.monotonic_ns()}"
        bin_dir.mkdir()
        for d in HOMEBREW_BIN + ("/usr/bin", "/bin"):
            if not os.path.isdir(d):
                continue
            for e in os.scandir(d):
                if e.name in drop or (add and e.name in add) or (bin_dir / e.name).exists():
                    continue
                os.symlink(e.path, bin_dir / e.name)
        for name, text in (add or {}).items():
            p = bin_dir / name
            p.write_text(text)
            p.chmod(0o755)
        self.set_remote_path(str(bin_dir))
        return bin_dir

    def make_run(self, name: str, files: dict[str, bytes], *, mtime: float | None = None) -> Path:
        run = self.output_dir / name
        run.mkdir(parents=True, exist_ok=True)
        for fname, data in files.items():
            (run / fname).write_bytes(data)
            if mtime is not None:
                os.utime(run / fname, (mtime, mtime))
        if mtime is not None:
            os.utime(run, (mtime, mtime))
        return run

    def stop(self) -> None:
        stop(self.proc, grace=5)
        self.proc = None


def _wait_banner(port: int, proc: Spawned, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(proc):
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def start_sshd(workdir: Path) -> SshServer:
    """Start sshd on a free loopback port with a throwaway host key and one authorized client key."""
    if not os.path.exists(SSHD):
        raise RuntimeError("sshd not found: apt-get install -y openssh-server rsync")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    host_pub = keygen(workdir / "host_ed25519", "host")
    keygen(workdir / "client_ed25519", "client")
    client_pub = (workdir / "client_ed25519.pub").read_text().strip()
    wrapper = workdir / "login.sh"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ -f "{workdir}/remote_path" ]; then PATH=$(cat "{workdir}/remote_path")\n'
        f'else PATH="{":".join(HOMEBREW_BIN)}:$PATH"; fi\nexport PATH\n'
        'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n')
    wrapper.chmod(0o755)
    # SHLVL=1: bash reads ~/.bashrc for sshd only when not nested. This machine's rc files are not
    # the box we emulate, and some are slow (pyenv init costs ~0.3 s per login).
    (workdir / "authorized_keys").write_text(
        f'command="{wrapper}",environment="SHLVL=1",no-pty,no-port-forwarding,no-agent-forwarding '
        f'{client_pub}\n')
    (workdir / "authorized_keys").chmod(0o600)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)     # privilege separation directory
    server = None
    for _ in range(5):
        port = free_port()
        cfg = workdir / "sshd_config"
        cfg.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {workdir / 'host_ed25519'}
PidFile none
AuthorizedKeysFile {workdir / 'authorized_keys'}
UsePAM no
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
Subsystem sftp {SFTP_SERVER}
PermitUserEnvironment yes
LogLevel ERROR
""")
        proc = spawn([SSHD, "-D", "-e", "-f", str(cfg)], log_path=workdir / "sshd.log")
        if _wait_banner(port, proc):
            server = SshServer(workdir, port, host_pub, workdir / "client_ed25519", getpass.getuser(), proc)
            break
        stop(proc, grace=2)
    if server is None:
        raise RuntimeError(f"sshd did not start; see {workdir / 'sshd.log'}")
    return server


def missing_tool() -> Optional[str]:
    """The first of ssh, ssh-keygen, rsync, scp, sshd this machine lacks, or None."""
    for tool in ("ssh", "ssh-keygen", "rsync", "scp"):
        if shutil.which(tool) is None:
            return tool
    return None if os.path.exists(SSHD) else "sshd"
