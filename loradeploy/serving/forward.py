"""The backend side of a forwarded request: one loopback connection per request, the request written and
the answer read by h11 in the client role, the answer's bytes copied to the client as they come, and the
requests in flight counted per backend port (the switch drains a backend by them).

The backend sees only what the proxy builds: the allow-listed path, the re-serialised body, a few
allow-listed client headers (``accept``, ``user-agent``) and, when the backend has one, its own key
(``Control.backend_key``). The client's Authorization, cookies, Proxy-* and hop-by-hop headers never
reach it. No byte from the backend for ``backend_timeout_s``: 504 (or the client connection cut, when
the answer had begun). Closing the backend connection is how a request is cancelled: a client that
leaves makes the caller cancel ``relay``, and llama-server stops a stream whose reader is gone."""
from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Optional, Protocol

import h11

from .assemble import assemble
from .metrics import body_tokens, tail_tokens, tokens_of
from .policy import Forward

if TYPE_CHECKING:
    from .control import Control
    from .proxy import Proxy

READ = 256 * 1024
PASS_HEADERS = frozenset({b"accept", b"user-agent"})  # of the client's; content-type and length are ours
DROP_RESPONSE = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"te",
                           b"trailer", b"transfer-encoding", b"upgrade", b"set-cookie"})
MAX_ASSEMBLED = 64 * 1024 * 1024   # a stream kept whole to build one answer from
MAX_COUNTED = 4 * 1024 * 1024      # a JSON answer kept whole to count its tokens
CONNECT_RETRY_S = 5.0


class BackendError(Exception):
    """No usable answer from the backend: ``status`` is what the client gets when nothing was sent yet."""
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Client(Protocol):
    """The client's side, as the front door offers it (serving.front.Conn)."""
    def start(self, status: int, headers: list[tuple[bytes, bytes]], reason: bytes = b"") -> None: ...
    def send(self, data: bytes) -> None: ...
    async def flush(self) -> None: ...
    async def finish(self) -> None: ...
    async def reply_json(self, status: int, obj) -> None: ...


def request_bytes(fw: Forward, port: int, key: Optional[str], headers) -> tuple[bytes, h11.Connection]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=READ)
    hs = [(b"host", b"127.0.0.1:%d" % port)]
    hs += [(k, v) for k, v in headers if k in PASS_HEADERS]
    if key:
        hs.append((b"authorization", b"Bearer " + key.encode()))
    if fw.body is not None:
        hs += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(fw.body))]
    hs.append((b"connection", b"close"))
    out = conn.send(h11.Request(method=fw.method, target=fw.path, headers=hs))
    if fw.body:
        out += conn.send(h11.Data(data=fw.body))
    return out + conn.send(h11.EndOfMessage()), conn


class Moved(Exception):
    """The backend this request was routed for is gone and the control file names another: route it
    again (in adapter mode the port's lora selection belongs to one backend's adapter ids)."""


async def _connect(proxy: "Proxy", control: Optional["Control"], deadline: float):
    """A connection to ``control``'s backend. A refused connect re-reads the control file and retries
    until ``deadline``, which covers the moment between a switch and the old backend closing its
    socket; when the file names another backend by then: Moved."""
    while True:
        if control is not None:
            try:
                async with asyncio.timeout(CONNECT_RETRY_S):
                    return await asyncio.open_connection("127.0.0.1", control.backend_port, limit=READ)
            except (OSError, TimeoutError):
                pass
        if asyncio.get_running_loop().time() > deadline:
            raise BackendError(502, "no backend is reachable" if control else "no backend is configured")
        await asyncio.sleep(0.05)
        proxy.reload_control()
        if proxy.control != control:
            raise Moved


class _Exchange:
    def __init__(self, reader: asyncio.StreamReader, conn: h11.Connection, timeout: float):
        self.reader, self.conn, self.timeout = reader, conn, timeout

    async def more(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                data = await self.reader.read(READ)
        except TimeoutError:
            raise BackendError(504, f"the backend sent nothing for {self.timeout:g}s") from None
        self.conn.receive_data(data)

    async def event(self):
        while True:
            try:
                ev = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise BackendError(502, f"the backend's answer is not valid HTTP: {exc}") from None
            if ev is not h11.NEED_DATA:
                return ev
            await self.more()


async def relay(proxy: "Proxy", control: Optional["Control"], fw: Forward, headers, client: Client,
                deadline: float) -> tuple[int, Optional[tuple[int, int]]]:
    """Send ``fw`` (routed for ``control``) to its backend and the answer to ``client``: (status,
    (prompt, generated) tokens)."""
    reader, writer = await _connect(proxy, control, deadline)
    assert control is not None
    port = control.backend_port
    key = str(port)
    inflight = proxy.inflight
    inflight[key] = inflight.get(key, 0) + 1
    try:
        data, conn = request_bytes(fw, port, control.backend_key, headers)
        writer.write(data)
        ex = _Exchange(reader, conn, proxy.limits.backend_timeout_s)
        resp = await ex.event()
        while type(resp) is h11.InformationalResponse:
            resp = await ex.event()
        if type(resp) is not h11.Response:
            raise BackendError(502, "the backend closed the connection without an answer")
        ctype = b""
        out_headers = []
        for k, v in resp.headers:
            if k == b"content-type":
                ctype = v
            if k not in DROP_RESPONSE:
                out_headers.append((k, v))
        out_headers.append((b"connection", b"keep-alive"))  # h11 makes it close where the client cannot keep it
        sse = ctype.startswith(b"text/event-stream")
        if fw.assemble and resp.status_code == 200 and sse:
            return await _assembled(fw.assemble, ex, client)
        client.start(resp.status_code, out_headers, resp.reason)
        return resp.status_code, await _copy(ex, client, sse, ctype.startswith(b"application/json"))
    finally:
        n = inflight.get(key, 1) - 1
        if n:
            inflight[key] = n
        else:
            inflight.pop(key, None)
        writer.close()


async def _copy(ex: _Exchange, client: Client, sse: bool, counted: bool) -> Optional[tuple[int, int]]:
    """The answer's body, copied as it comes: everything one read brings is written at once. Only the
    last few pieces of a stream are kept (its usage and timings are at its end)."""
    tail: deque = deque(maxlen=3)
    whole: Optional[list] = [] if counted else None
    size = 0
    conn = ex.conn
    while True:
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BackendError(502, f"the backend's answer is not valid HTTP: {exc}") from None
        if ev is h11.NEED_DATA:
            await client.flush()
            await ex.more()
            continue
        t = type(ev)
        if t is h11.Data:
            client.send(ev.data)
            if sse:
                tail.append(ev.data)
            elif whole is not None:
                size += len(ev.data)
                if size <= MAX_COUNTED:
                    whole.append(ev.data)
                else:
                    whole = None
        elif t is h11.EndOfMessage:
            await client.finish()
            if sse:
                return tail_tokens(tail)
            return body_tokens(b"".join(whole)) if whole else None
        else:
            raise BackendError(502, "the backend closed the connection before its answer ended")


async def _assembled(kind: str, ex: _Exchange, client: Client) -> tuple[int, Optional[tuple[int, int]]]:
    parts, size = [], 0
    while True:
        ev = await ex.event()
        t = type(ev)
        if t is h11.Data:
            size += len(ev.data)
            if size > MAX_ASSEMBLED:
                raise BackendError(502, "the backend's answer is too large to assemble")
            parts.append(ev.data)
        elif t is h11.EndOfMessage:
            break
        else:
            raise BackendError(502, "the backend closed the connection before its answer ended")
    try:
        status, obj = assemble(kind, b"".join(parts))
    except ValueError as exc:
        raise BackendError(502, f"the backend's stream could not be read: {exc}") from None
    await client.reply_json(status, obj)
    return status, tokens_of(obj)


GAUGES_TIMEOUT_S = 2.0
MAX_GAUGES = 1024 * 1024


async def backend_gauges(proxy: "Proxy") -> str:
    """The backend's own ``llamacpp:*`` series (slots decoding, requests deferred, tokens), asked of it with
    its key and appended to the port's ``/metrics``, so one scrape of a port shows both. The backend's
    other lines are dropped; no answer within ``GAUGES_TIMEOUT_S`` (or the python backend, which has no
    ``/metrics``): only ``loradeploy_backend_metrics_up 0``."""
    control = proxy.control
    text = ""
    if control is not None:
        try:
            async with asyncio.timeout(GAUGES_TIMEOUT_S):
                reader, writer = await asyncio.open_connection("127.0.0.1", control.backend_port, limit=READ)
                try:
                    data, conn = request_bytes(Forward("GET", "/metrics"), control.backend_port,
                                               control.backend_key, [])
                    writer.write(data)
                    ex = _Exchange(reader, conn, GAUGES_TIMEOUT_S)
                    resp, body = await ex.event(), bytearray()
                    while type(resp) is h11.InformationalResponse:
                        resp = await ex.event()
                    while type(resp) is h11.Response and resp.status_code == 200 and len(body) <= MAX_GAUGES:
                        ev = await ex.event()
                        if type(ev) is h11.Data:
                            body += ev.data
                        elif type(ev) is h11.EndOfMessage:
                            text = body.decode("utf-8", errors="replace")
                            break
                        else:
                            break
                finally:
                    writer.close()
        except (OSError, TimeoutError, BackendError):
            text = ""
    keep = [line for line in text.splitlines()
            if line.startswith(("llamacpp:", "# HELP llamacpp:", "# TYPE llamacpp:"))]
    up = "# TYPE loradeploy_backend_metrics_up gauge\n" + f"loradeploy_backend_metrics_up {1 if keep else 0}\n"
    return up + "".join(line + "\n" for line in keep)
