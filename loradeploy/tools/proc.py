"""Every subprocess goes through here: run() waits for a command, spawn() starts a long-running one.

Both take an argument list (no shell), copy output to a log file, and start the child in its own
session so it and its children can be stopped together. Nothing else in loradeploy calls Popen.
"""
from __future__ import annotations

import collections
import os
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from ..errors import ProcError
from .procid import Spawned, record_pid, record_ticks, identify, start_ticks

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


def spawn(args: Sequence[str | os.PathLike], *, log_path: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None, replace_env: bool = False) -> Spawned:
    """Start ``args`` detached (own session, stdin closed), stdout+stderr appended to ``log_path``.

    The process outlives this one; follow it with alive() / exit_signal() / stop().
    """
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
    return identify(proc.pid, Path(log_path))


def alive(p: "Spawned | Mapping | None") -> bool:
    """True when the process exists, is the same one (start time), and is not a zombie."""
    import psutil

    pid, ctime = record_pid(p)
    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        child.poll()  # collects our own exited child's status (no zombie) and keeps its returncode
    try:
        proc = psutil.Process(pid)
        want, now = record_ticks(p), None
        if want is not None and (now := start_ticks(pid)) is not None:
            if now != want:
                return False  # the pid now belongs to another process
        elif ctime and abs(proc.create_time() - ctime) > 1.0:
            return False  # no /proc (macOS): psutil's create_time, fixed at start there
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def exit_status(p: "Spawned | Mapping | None") -> Optional[int]:
    """The exit code of a child this process started and that has ended (negative: killed by that
    signal); None while it runs or when another process started it."""
    pid, _ = record_pid(p)
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


def _server_of(p: "Spawned | Mapping | None") -> Optional[dict]:
    """The record a supervisor wrote of its server (``server_record`` in ``p``: see supervise())."""
    path = p.get("server_record") if isinstance(p, Mapping) else None
    if not path:
        return None
    try:
        rec = json.loads(Path(path).read_text())
        return rec if isinstance(rec, dict) and rec.get("pid") else None
    except (OSError, ValueError):
        return None


def stop(p: "Spawned | Mapping | None", grace: float = 30.0) -> None:
    """SIGTERM the process group (it may finish work in flight), SIGKILL after ``grace`` seconds.
    A supervisor's record also names its server: that is stopped too if it outlived the supervisor."""
    pid, _ = record_pid(p)
    server = _server_of(p)
    if alive(p):
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
    if server is not None and alive(server):
        stop(server, grace=min(grace, 5.0))


def _die_with_parent() -> None:
    """In a supervised child before exec (Linux): be killed when the supervisor dies, even by SIGKILL."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os._exit(1)


class _DeathWatch:
    """Where there is no PR_SET_PDEATHSIG (macOS): a watchdog process (tools/deathwatch.py) holds
    a pipe only this process writes to; the server writes its pid into it before exec. The pipe
    closing without ``done`` — this process died, however — makes the watchdog SIGKILL the server."""

    def __init__(self) -> None:
        self.parent = os.getpid()
        r, self.w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(Path(__file__).with_name("deathwatch.py")), str(r)],
                pass_fds=(r,), stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(r)

    def preexec(self) -> None:
        os.write(self.w, f"{os.getpid()}\n".encode())
        if os.getppid() != self.parent:  # the supervisor died after the fork: the watchdog kills us
            os._exit(1)

    def release(self) -> None:
        """The server ended (or never started): the watchdog leaves without killing anything."""
        try:
            os.write(self.w, b"done\n")
        finally:
            os.close(self.w)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def supervise(args: Sequence[str | os.PathLike], *, env: Mapping[str, str] | None = None,
              record_path: Path | None = None) -> int:
    """Run ``args`` as a child sharing this process's stdout/stderr, pass SIGTERM/SIGINT/SIGHUP on to
    it, and return its exit status (negative: the signal that killed it). For a worker that must
    report how the real server ended, which only a parent can know.

    The child has its own process group, so a signal to the supervisor's group reaches it once
    (forwarded), not twice: llama-server takes a second SIGTERM as "exit now". It dies with the
    supervisor, so a supervisor killed outright leaves no server behind: PR_SET_PDEATHSIG on Linux,
    a watchdog process elsewhere (_DeathWatch). ``record_path`` gets the child's record (pid, start
    times), so stop() of a record naming it as ``server_record`` stops a server that outlived us."""
    argv = [os.fspath(a) for a in args]
    watch = None if sys.platform.startswith("linux") else _DeathWatch()
    try:
        child = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                                 process_group=0, preexec_fn=watch.preexec if watch else _die_with_parent)
    except BaseException:
        if watch:
            watch.release()
        raise
    try:
        if record_path is not None:
            from ..fsutil import atomic_write_text

            atomic_write_text(Path(record_path), json.dumps(identify(child.pid).as_record()))

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
    except BaseException:
        kill_group(child, signal.SIGKILL)   # whatever failed here, the server must not outlive us
        raise
    finally:
        if watch:
            watch.release()
