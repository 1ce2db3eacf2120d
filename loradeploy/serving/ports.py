"""Ports: who holds one, a free spare one, and the address a client uses for a bind host."""
from __future__ import annotations

import errno
import random
import socket
from typing import Optional

from ..errors import ResourceError


def port_holder(host: str, port: int) -> Optional[str]:
    """None when ``port`` can be bound on ``host``; else a description of who holds it."""
    import psutil

    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return None
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                return f"unusable ({exc.strerror})"
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                try:
                    name = psutil.Process(c.pid).name()
                except psutil.Error:
                    name = "?"
                return f"held by pid {c.pid} ({name})"
    except psutil.Error:
        pass
    return "held by another process (pid not visible to this user)"


def pick_spare(port_range: tuple[int, int], taken: set[int] = frozenset()) -> int:
    """A free loopback port from ``port_range`` (random start, so parallel callers rarely collide)."""
    lo, hi = port_range
    ports = list(range(lo, hi + 1))
    start = random.randrange(len(ports))
    for port in ports[start:] + ports[:start]:
        if port not in taken and port_holder("127.0.0.1", port) is None:
            return port
    raise ResourceError(f"no free port in deployment.llamacpp.spare_port_range {lo}-{hi}",
                        hint="widen the range or stop what holds those ports")


def client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def pid_listening_on(port: int) -> Optional[int]:
    import psutil

    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return c.pid
    except (psutil.Error, OSError):
        return None
    return None
