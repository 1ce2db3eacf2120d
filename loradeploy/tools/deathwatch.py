"""The watchdog that makes a supervised server die with its supervisor where the kernel cannot
(macOS has no PR_SET_PDEATHSIG): ``python -I -S deathwatch.py FD``.

The supervisor (tools.proc.supervise) starts this first, in its own session so that no signal
meant for the supervisor's group reaches it, holding the read end of a pipe whose write end only
the supervisor keeps. The server writes its pid into the pipe before it execs. When the supervisor
ends normally it writes ``done`` and closes the pipe; any other end of the pipe (EOF without
``done``: the supervisor was killed, even by SIGKILL) makes this SIGKILL the server's process
group. Standalone on purpose: run with -I -S it imports nothing but os, signal and sys.
"""
from __future__ import annotations

import os
import signal
import sys


def read_until_closed(fd: int) -> list[str]:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data.decode("ascii", errors="replace").split()


def kill_tree(pid: int) -> None:
    for kill in (os.killpg, os.kill):   # the server leads its own group; before setpgid, only itself
        try:
            kill(pid, signal.SIGKILL)
            return
        except OSError:
            continue


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGHUP):   # a terminal's ^C or hang-up is not the supervisor dying
        signal.signal(sig, signal.SIG_IGN)
    words = read_until_closed(int(argv[0]))
    if "done" in words:
        return 0
    for w in words:
        if w.isdigit() and int(w) > 1:
            kill_tree(int(w))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
