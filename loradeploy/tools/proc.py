"""Every subprocess goes through run(): argument list, no shell, output copied to the stage log."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import ProcError

TAIL_LINES = 30


def _tail_text(lines: collections.deque[str]) -> str:
    return "".join(lines).strip()


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
