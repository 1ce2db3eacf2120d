"""Every subprocess goes through here: run() waits for a command, spawn() starts a long-running one.

Both take an argument list (no shell), copy output to a log file, and start the child in its own
session so it and its children can be stopped together. Nothing else in loradeploy calls Popen.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from ..errors import ProcError

TAIL_LINES = 30


def _tail_text(lines: collections.deque[str]) -> str:
    return "".join(lines).strip()


def package_pythonpath(base: Mapping[str, str] | None = None) -> str:
    """PYTHONPATH for a child that runs ``python -m loradeploy...``: this package first, so the child
    imports it even when loradeploy runs from a checkout rather than an installed copy."""
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([root, *filter(None, [(base if base is not None else os.environ).get("PYTHONPATH")])])


def run(
    args: Sequence[str | os.PathLike],
    *,
    log_path: Path | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
    error_cls: type[ProcError] = ProcError,
    what: str | None = None,
    on_line: Callable[[str], None] | None = None,
    input_bytes: bytes | None = None,
) -> subprocess.CompletedProcess:
    """Run ``args``; stream merged stdout/stderr into ``log_path`` (appending) and keep a tail.

    Raises ``error_cls`` (a ProcError) with command, exit code and the output tail when the
    command fails, is not found, or exceeds ``timeout``.
    """
    argv = [os.fspath(a) for a in args]
    label = what or Path(argv[0]).name
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    captured: list[str] = []
    log_f = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_f = open(log_path, "a", encoding="utf-8", errors="replace")
        log_f.write(f"$ {' '.join(argv)}\n")
        log_f.flush()
    try:
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise error_cls(f"{label}: command not found: {argv[0]}", command=argv, returncode=127,
                            hint="install it or put it on PATH") from exc
        if input_bytes is not None:
            def feed():
                try:
                    proc.stdin.write(input_bytes)
                    proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
            threading.Thread(target=feed, daemon=True).start()

        def pump():
            assert proc.stdout is not None
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                tail.append(line)
                captured.append(line)
                if log_f:
                    log_f.write(line)
                    log_f.flush()
                if on_line:
                    try:
                        on_line(line.rstrip("\n"))
                    except Exception:  # a progress callback must never kill the command
                        pass

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    timed_out = True
                    kill_group(proc)
                    proc.wait()
                    break
            except BaseException:
                kill_group(proc)
                proc.wait()
                raise
        reader.join(timeout=5)
        out = "".join(captured)
        if log_f:
            log_f.write(f"[exit {proc.returncode}]\n")
        if timed_out:
            raise error_cls(f"{label} timed out after {timeout:.0f}s", command=argv,
                            returncode=proc.returncode, stderr_tail=_tail_text(tail),
                            hint="raise the timeout or check the remote end")
        if check and proc.returncode != 0:
            last = _tail_text(tail).splitlines()[-1:] or [""]
            raise error_cls(f"{label} failed with exit code {proc.returncode}: {last[0][:300]}",
                            command=argv, returncode=proc.returncode, stderr_tail=_tail_text(tail),
                            hint=f"see {log_path}" if log_path else None)
        return subprocess.CompletedProcess(argv, proc.returncode, out, "")
    finally:
        if log_f:
            log_f.close()


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Stop a process started with start_new_session=True and its children."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------- long-running processes

_CHILDREN: dict[int, subprocess.Popen] = {}  # our own children, reaped here so none lingers as a zombie


@dataclass(frozen=True)
class Spawned:
    """A detached process: pid plus its start time, so a reused pid is never mistaken for it."""

    pid: int
    create_time: float
    log_path: Optional[Path] = None
    start_ticks: Optional[int] = None

    def as_record(self) -> dict:
        return {"pid": self.pid, "create_time": self.create_time, "start_ticks": self.start_ticks}


def start_ticks(pid: int) -> Optional[int]:
    """When the process started, in clock ticks since boot (/proc/PID/stat field 22): unlike psutil's
    create_time (boot time from the wall clock + this), it does not move when the wall clock is
    stepped, so a record still names its process after an NTP or VM clock jump."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def spawn(args: Sequence[str | os.PathLike], *, log_path: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None, replace_env: bool = False) -> Spawned:
    """Start ``args`` detached (own session, stdin closed), stdout+stderr appended to ``log_path``.

    The process outlives this one; follow it with alive() / exit_signal() / stop().
    """
    import psutil

    argv = [os.fspath(a) for a in args]
    full_env = dict(env or {}) if replace_env else {**os.environ, **(env or {})}
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_f:
        log_f.write(f"$ {' '.join(argv)}\n".encode())
        log_f.flush()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, stdout=log_f,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except FileNotFoundError as exc:
            raise ProcError(f"{Path(argv[0]).name}: command not found: {argv[0]}", command=argv,
                            returncode=127, hint="install it or put it on PATH") from exc
    _CHILDREN[proc.pid] = proc
    try:
        ctime = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        ctime = 0.0
    return Spawned(proc.pid, ctime, Path(log_path), start_ticks(proc.pid))


def _rec(p: "Spawned | Mapping | None") -> tuple[int, float]:
    if p is None:
        return 0, 0.0
    if isinstance(p, Spawned):
        return p.pid, p.create_time
    return int(p.get("pid") or 0), float(p.get("create_time") or 0.0)


def _ticks(p: "Spawned | Mapping | None") -> Optional[int]:
    t = p.start_ticks if isinstance(p, Spawned) else (p or {}).get("start_ticks")
    return int(t) if t is not None else None


def alive(p: "Spawned | Mapping | None") -> bool:
    """True when the process exists, is the same one (start time), and is not a zombie."""
    import psutil

    pid, ctime = _rec(p)
    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        child.poll()  # collects our own exited child's status (no zombie) and keeps its returncode
    try:
        proc = psutil.Process(pid)
        want, now = _ticks(p), None
        if want is not None and (now := start_ticks(pid)) is not None:
            if now != want:
                return False  # the pid now belongs to another process
        elif ctime and abs(proc.create_time() - ctime) > 1.0:
            return False  # (no /proc: the wall-clock start time, which a clock step can move)
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def exit_status(p: "Spawned | Mapping | None") -> Optional[int]:
    """The exit code of a child this process started and that has ended (negative: killed by that
    signal); None while it runs or when another process started it."""
    pid, _ = _rec(p)
    child = _CHILDREN.get(pid)
    return None if child is None else child.poll()


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "exited (status unknown: not our child)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def stop(p: "Spawned | Mapping | None", grace: float = 30.0) -> None:
    """SIGTERM the process group (it may finish work in flight), SIGKILL after ``grace`` seconds."""
    pid, _ = _rec(p)
    if not alive(p):
        _CHILDREN.pop(pid, None)
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        end = time.monotonic() + wait
        while time.monotonic() < end and alive(p):
            time.sleep(0.05)
        if not alive(p):
            break
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        try:
            child.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


def _die_with_parent() -> None:
    """In a supervised child before exec: be killed when the supervisor dies, even by SIGKILL."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os._exit(1)


def supervise(args: Sequence[str | os.PathLike], *, env: Mapping[str, str] | None = None) -> int:
    """Run ``args`` as a child sharing this process's stdout/stderr, pass SIGTERM/SIGINT/SIGHUP on to
    it, and return its exit status (negative: the signal that killed it). For a worker that must
    report how the real server ended, which only a parent can know.

    The child has its own process group, so a signal to the supervisor's group reaches it once
    (forwarded), not twice: llama-server takes a second SIGTERM as "exit now". It dies with the
    supervisor (PR_SET_PDEATHSIG), so a supervisor killed outright leaves no server behind."""
    argv = [os.fspath(a) for a in args]
    child = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                             process_group=0, preexec_fn=_die_with_parent)

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            return child.wait()
        except InterruptedError:
            continue
