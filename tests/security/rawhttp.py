"""Raw HTTP/1.x over a socket for the hostile-input suite: bytes out exactly as written, and every read
under a deadline, so a case that the server does not answer ends as "no answer" instead of a hang."""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

HOST = "127.0.0.1"


@dataclass
class Answer:
    """What came back on one connection: the first response (if any), and whether the server closed."""
    status: Optional[int]                 # None: no complete response head arrived before the deadline
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    raw: bytes = b""
    closed: bool = False                  # the server closed the connection (EOF or reset) by the deadline
    elapsed: float = 0.0
    rest: bytes = b""                     # bytes after the first response (a second, pipelined response)

    def header(self, name: str) -> Optional[str]:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def json(self):
        return json.loads(self.body)

    def error_json(self) -> bool:
        """The body is OpenAI's error shape: {"error": {"message": ...}}."""
        try:
            obj = json.loads(self.body)
        except ValueError:
            return False
        return isinstance(obj, dict) and isinstance(obj.get("error"), dict) and bool(obj["error"].get("message"))

    def __repr__(self) -> str:
        return (f"Answer(status={self.status}, closed={self.closed}, {self.elapsed:.2f}s, "
                f"raw={self.raw[:300]!r}{'...' if len(self.raw) > 300 else ''})")


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _parse(raw: bytes, head_request: bool = False) -> tuple[Optional[int], list, bytes, bytes, bool]:
    """(status, headers, body, rest, complete) of the first response in ``raw``."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return None, [], b"", b"", False
    lines = raw[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        return None, [], b"", b"", False
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    hv = {k.lower(): v for k, v in headers}
    after = raw[end + 4:]
    if head_request or status in (204, 304) or 100 <= status < 200:
        return status, headers, b"", after, True
    if "chunked" in hv.get("transfer-encoding", "").lower():
        body, pos = b"", 0
        while True:
            nl = after.find(b"\r\n", pos)
            if nl < 0:
                return status, headers, body, b"", False
            try:
                size = int(after[pos:nl].split(b";")[0], 16)
            except ValueError:
                return status, headers, body, b"", True
            if size == 0:
                tail = after.find(b"\r\n\r\n", nl)
                if tail < 0:
                    return status, headers, body, b"", False
                return status, headers, body, after[tail + 4:], True
            if len(after) < nl + 2 + size + 2:
                return status, headers, body, b"", False
            body += after[nl + 2:nl + 2 + size]
            pos = nl + 2 + size + 2
    if "content-length" in hv:
        n = int(hv["content-length"])
        return status, headers, after[:n], after[n:], len(after) >= n
    return status, headers, after, b"", False  # read to EOF


def exchange(port: int, data: bytes | list[bytes], *, timeout: float = 15.0, head_request: bool = False,
             wait_close: float = 0.0, gap: float = 0.0, sock: Optional[socket.socket] = None) -> Answer:
    """Send ``data`` (or its pieces, ``gap`` seconds apart), then read the first response under a deadline
    of ``timeout`` seconds. With ``wait_close``, keep reading up to that long past the response to see
    whether the server closes the connection (and what else it sends)."""
    t0 = time.monotonic()
    s = sock or connect(port, timeout)
    raw, closed = b"", False
    try:
        try:
            for i, piece in enumerate(data if isinstance(data, list) else [data]):
                if i and gap:
                    time.sleep(gap)
                s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # the server may answer (413, 431) and close, or stop reading, before all of a large request is sent
        deadline, close_by = t0 + timeout, None
        while True:
            if close_by is None and _parse(raw, head_request)[4]:
                if not wait_close:
                    break
                close_by = deadline = time.monotonic() + wait_close  # then only: does the server close?
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except (ConnectionResetError, ConnectionAbortedError):
                closed = True
                break
            if not chunk:
                closed = True
                break
            raw += chunk
        status, headers, body, rest, _ = _parse(raw, head_request)
        return Answer(status, headers, body, raw, closed, time.monotonic() - t0, rest)
    finally:
        if sock is None:
            s.close()


def request(method: str, target: str, body: bytes | None = None, *, headers: dict | list | None = None,
            version: str = "HTTP/1.1", key: Optional[str] = None, json_type: bool = True) -> bytes:
    """A request as bytes: Host, then the given headers, then Content-Length for ``body`` unless the
    headers already frame it."""
    hs: list[tuple[str, str]] = [("Host", f"{HOST}")]
    if key:
        hs.append(("Authorization", f"Bearer {key}"))
    given = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    hs += given
    names = {k.lower() for k, _ in given}
    if body is not None:
        if json_type and "content-type" not in names:
            hs.append(("Content-Type", "application/json"))
        if "content-length" not in names and "transfer-encoding" not in names:
            hs.append(("Content-Length", str(len(body))))
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs) + "\r\n"
    return head.encode("latin-1") + (body or b"")


def chat_body(prompt: str, *, max_tokens: int = 16, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            **extra}
