"""The client side of a served port: h11 frames every request and response; this module adds the checks
h11 leaves to its user and the port's limits, then hands each request to ``policy.route`` and either
answers it or has ``forward.relay`` answer it from the backend.

- **Framing.** What h11 refuses is answered with its status (400, or 431 for a head over the limit). A
  head is also refused when h11 would accept it but a proxy must not: an obs-folded line, two
  Content-Length fields, Content-Length with Transfer-Encoding, chunked on HTTP/1.0 (400); over
  ``max_head`` bytes or ``max_headers`` fields (431). Every refusal of the framing closes the connection.
  HTTP/1.0 clients never get chunked answers and HEAD never gets a body (h11).
- **Limits** (``control.Limits``). A body over ``max_body``: 413 before anything past the cap is read
  (a declared Content-Length over it is answered at once). A head not whole ``head_timeout_s`` after the
  connection opened or its first byte, or a body not whole after ``body_timeout_s``: 408 and close; a
  kept-alive connection idle for ``idle_timeout_s``: closed.
- **A client that leaves** while its request is at the backend (its connection reads EOF) cancels the
  relay, which closes the backend connection: llama-server then stops generating."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Optional

import h11

from . import forward
from .metrics import CONTENT_TYPE, route_label
from .policy import BadRequest, Reply, error, normalise_path, route

if TYPE_CHECKING:
    from .control import Limits
    from .proxy import Proxy

READ = 256 * 1024
HIGH_WATER = 256 * 1024        # drain the client's socket only when this much waits to be sent
LINGER_S = 2.0                 # after a refusal, how long the rest of a request is read and dropped
LINGER_BYTES = 1024 * 1024
JSON = b"application/json"
CLIENT_GONE = 499              # the status recorded for a request whose client left (nginx's)
_HEAD_END = re.compile(rb"\r?\n\r?\n")


class ClientGone(ConnectionError):
    pass


def head_problem(raw: bytes, req: h11.Request, limits: "Limits") -> Optional[tuple[int, str]]:
    """What h11 let through but a proxy must refuse, from the raw bytes of the request head."""
    raw = raw.lstrip(b"\r\n")
    end = _HEAD_END.search(raw)
    head = raw[:end.start()] if end else raw
    if len(head) > limits.max_head:
        return 431, f"the request head is over {limits.max_head} bytes"
    lines = head.split(b"\n")[1:]
    if len(lines) > limits.max_headers:
        return 431, f"more than {limits.max_headers} header fields"
    if any(line[:1] in (b" ", b"\t") for line in lines):
        return 400, "an obsolete folded header line"
    names = [line.split(b":", 1)[0].strip().lower() for line in lines]
    lengths, chunked = names.count(b"content-length"), names.count(b"transfer-encoding")
    if lengths > 1:
        return 400, "more than one Content-Length"
    if lengths and chunked:
        return 400, "both Content-Length and Transfer-Encoding"
    if chunked and req.http_version < b"1.1":
        return 400, "Transfer-Encoding on HTTP/1.0"
    return None


def _client_error(exc: h11.RemoteProtocolError) -> int:
    """A framing error is the client's: 400 or h11's more precise 4xx (431), never 5xx (its 501 for an
    unknown transfer coding included)."""
    hint = exc.error_status_hint
    return hint if 400 <= hint < 500 else 400


def _get(headers, name: bytes) -> Optional[bytes]:
    for k, v in headers:
        if k == name:
            return v
    return None


class Conn:
    """One client connection, request after request."""

    def __init__(self, proxy: "Proxy", reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.p, self.r, self.w = proxy, reader, writer
        self.limits = proxy.limits
        self.h = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        self.raw = bytearray()      # the bytes of the head being read (its checks need them)
        self.out: list[bytes] = []  # framed bytes waiting for flush()
        self.head_only = False      # answering a HEAD request
        self.broken = False         # the connection cannot carry another request (or an answer)

    # ------------------------------------------------------------------------- output (forward's Client)

    def start(self, status: int, headers: list[tuple[bytes, bytes]], reason: bytes = b"") -> None:
        if not reason:
            try:
                reason = HTTPStatus(status).phrase.encode()
            except ValueError:
                reason = b""
        self.out.append(self.h.send(h11.Response(status_code=status, headers=headers, reason=reason)))

    def send(self, data: bytes) -> None:
        if not self.head_only and data:
            self.out.append(self.h.send(h11.Data(data=data)))

    async def flush(self) -> None:
        if not self.out:
            return
        transport = self.w.transport
        if transport.is_closing():
            raise ClientGone("the client left")
        self.w.write(self.out[0] if len(self.out) == 1 else b"".join(self.out))
        self.out.clear()
        if transport.get_write_buffer_size() > HIGH_WATER:
            await self.w.drain()

    async def finish(self) -> None:
        self.out.append(self.h.send(h11.EndOfMessage()))
        await self.flush()

    async def reply(self, status: int, body: bytes, ctype: bytes = JSON, headers=(), close: bool = False) -> int:
        hs = [(b"content-type", ctype), (b"content-length", b"%d" % len(body)), *headers,
              (b"connection", b"close" if close else b"keep-alive")]
        self.start(status, hs)
        self.send(body)
        await self.finish()
        return status

    async def reply_json(self, status: int, obj) -> None:
        await self.reply(status, json.dumps(obj).encode())

    async def refuse(self, status: int, message: str, code: str = "bad_request", headers=()) -> int:
        """An error answer that ends the connection (when an answer can still be given at all)."""
        self.broken = True
        if self.h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            hs = [(k.encode(), v.encode()) for k, v in headers]
            body = json.dumps(error(status, message, code).obj).encode()
            try:
                await self.reply(status, body, headers=hs, close=True)
            except (ConnectionError, h11.LocalProtocolError):
                pass
        return status

    # ------------------------------------------------------------------------- input

    async def _read(self, deadline: float) -> bytes:
        async with asyncio.timeout_at(deadline):
            return await self.r.read(READ)

    async def request(self, kept: bool) -> Optional[h11.Request]:
        """The next request's head, or None when the connection ends (answered with why, if it can be)."""
        loop = asyncio.get_running_loop()
        lim = self.limits
        now = loop.time()
        started = None if kept and not self.raw else now
        while True:
            try:
                ev = self.h.next_event()
            except h11.RemoteProtocolError as exc:
                await self.refuse(_client_error(exc), str(exc))
                return None
            if ev is h11.NEED_DATA:
                deadline = (started + lim.head_timeout_s) if started is not None else now + lim.idle_timeout_s
                try:
                    data = await self._read(deadline)
                except TimeoutError:
                    if started is not None and (self.raw or not kept):
                        await self.refuse(408, "the request head did not arrive in time", "timeout")
                    return None
                if started is None:
                    started = loop.time()
                self.raw += data
                if len(self.raw) > lim.max_head:  # before h11 parses a head that came whole in one read
                    end = _HEAD_END.search(self.raw.lstrip(b"\r\n"))
                    if end is None or end.start() > lim.max_head:
                        await self.refuse(431, f"the request head is over {lim.max_head} bytes")
                        return None
                self.h.receive_data(data)
                continue
            if type(ev) is h11.Request:
                problem = head_problem(bytes(self.raw), ev, lim)
                if problem:
                    await self.refuse(*problem)
                    return None
                return ev
            return None  # the client closed the connection between requests

    async def body(self, cap: int) -> bytes | int:
        """The whole request body, or the status it was refused with (413 over ``cap``, 408 late, 400 bad)."""
        h = self.h
        if h.they_are_waiting_for_100_continue:
            self.out.append(h.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
            await self.flush()
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout_s
        parts, total = [], 0
        while True:
            try:
                ev = h.next_event()
            except h11.RemoteProtocolError as exc:
                return await self.refuse(_client_error(exc), str(exc))
            t = type(ev)
            if t is h11.Data:
                total += len(ev.data)
                if total > cap:
                    return await self.refuse(413, f"the request body is over {cap} bytes", "body_too_large")
                parts.append(ev.data)
            elif t is h11.EndOfMessage:
                return b"".join(parts)
            elif ev is h11.NEED_DATA:
                try:
                    data = await self._read(deadline)
                except TimeoutError:
                    return await self.refuse(408, "the request body did not arrive in time", "timeout")
                h.receive_data(data)
            else:  # ConnectionClosed mid-body is a RemoteProtocolError in h11; nothing else can come
                self.broken = True
                return CLIENT_GONE

    # ------------------------------------------------------------------------- one request

    async def handle(self, req: h11.Request) -> int:
        p, lim = self.p, self.limits
        method = req.method.decode("ascii")
        self.head_only = method == "HEAD"
        headers = list(req.headers)
        has_body = _get(headers, b"transfer-encoding") is not None or (_get(headers, b"content-length") or b"0") != b"0"
        if not p.authorized(_get(headers, b"authorization")):
            p.status["refused"] += 1
            self.broken = self.broken or has_body  # its body is never read
            return await self.reply(401, json.dumps(error(
                401, "missing or wrong API key: send Authorization: Bearer KEY", "invalid_api_key").obj).encode(),
                headers=[(b"www-authenticate", b"Bearer")], close=has_body)
        declared = _get(headers, b"content-length")
        if declared is not None and int(declared) > lim.max_body:
            return await self.refuse(413, f"the request body is over {lim.max_body} bytes", "body_too_large")
        body = await self.body(lim.max_body)
        if isinstance(body, int):
            return body
        deadline = asyncio.get_running_loop().time() + forward.CONNECT_RETRY_S
        while True:
            control, info = p.control, p.port_info  # one consistent pair: a SIGHUP sets both at once
            decided = route(method, req.target, headers, body, info)
            if isinstance(decided, Reply):
                if decided.page == "metrics":
                    return await self.reply(200, (p.metrics_text() + await forward.backend_gauges(p)).encode(),
                                            CONTENT_TYPE.encode())
                hs = [(k.encode(), v.encode()) for k, v in decided.headers]
                return await self.reply(decided.status, json.dumps(decided.obj).encode(), headers=hs)
            try:
                return await self.forward(forward.relay(p, control, decided, headers, self, deadline))
            except forward.Moved:
                continue  # routed again for the backend the control file names now

    async def forward(self, relaying) -> int:
        """Relay to the backend while watching the client: EOF from it cancels the relay."""
        relay = asyncio.ensure_future(relaying)
        watch: Optional[asyncio.Future] = None
        watched = 0
        try:
            while True:
                if watch is None and watched <= self.limits.max_head:
                    watch = asyncio.ensure_future(self.r.read(READ))
                await asyncio.wait([relay, watch] if watch else [relay], return_when=asyncio.FIRST_COMPLETED)
                if watch is not None and watch.done():
                    try:
                        data = watch.result()
                    except ConnectionError:
                        data = b""
                    watch = None
                    self.h.receive_data(data)  # a pipelined next request, kept for the next cycle; or EOF
                    watched += len(data)
                    if not data:
                        self.broken = True
                        if not relay.done():
                            relay.cancel()
                            with contextlib.suppress(BaseException):
                                await relay
                            return CLIENT_GONE
                if relay.done():
                    break
            code, counted = relay.result()
        except asyncio.CancelledError:
            relay.cancel()
            raise
        except forward.BackendError as exc:
            if self.h.our_state is h11.SEND_RESPONSE:
                return await self.refuse(exc.status, str(exc), "backend_error")
            self.broken = True  # the answer had begun: cut it, so the client sees it incomplete
            return exc.status
        except (ClientGone, ConnectionError):
            self.broken = True
            return CLIENT_GONE
        finally:
            if watch is not None:
                await self._unwatch(watch)
        self.p.metrics.tokens(counted)
        self.p.status["served"] += 1
        return code

    async def _unwatch(self, watch: asyncio.Future) -> None:
        """Stop watching the client; what the watch read meanwhile goes to h11 (one reader at a time)."""
        watch.cancel()
        await asyncio.wait([watch])
        if watch.cancelled():
            return
        try:
            data = watch.result()
        except ConnectionError:
            data = b""
        self.h.receive_data(data)
        if not data:
            self.broken = True

    # ------------------------------------------------------------------------- the connection

    async def run(self) -> None:
        p = self.p
        kept = False
        try:
            while not self.broken:
                req = await self.request(kept)
                if req is None:
                    break
                t0 = time.monotonic()
                try:
                    label = route_label(normalise_path(req.target))
                except BadRequest:
                    label = route_label(None)
                p.requests_in_flight += 1
                try:
                    code = await self.handle(req)
                except (ConnectionError, TimeoutError):
                    code, self.broken = CLIENT_GONE, True
                except Exception as exc:  # never a traceback with no answer
                    p.log(f"proxy: {req.method.decode()} {req.target[:200]!r} failed: {type(exc).__name__}: {exc}")
                    code = await self.refuse(500, "the proxy failed on this request", "server_error")
                finally:
                    p.requests_in_flight -= 1
                p.metrics.observe(label, code, time.monotonic() - t0)
                if self.broken or self.h.our_state is not h11.DONE or self.h.their_state is not h11.DONE:
                    break
                self.h.start_next_cycle()
                self.raw = bytearray(self.h.trailing_data[0])
                kept = True
        except (ConnectionError, TimeoutError):
            pass
        finally:
            await self.close()

    async def close(self) -> None:
        """Close; when the client may still be sending (a refused request), first stop writing and read
        what it sends for a moment, so the answer is not lost to a reset."""
        w = self.w
        try:
            if self.out:
                await self.flush()
            if self.h.their_state not in (h11.DONE, h11.CLOSED, h11.IDLE) and w.can_write_eof():
                w.write_eof()
                end = asyncio.get_running_loop().time() + LINGER_S
                dropped = 0
                while dropped < LINGER_BYTES:
                    data = await self._read(end)
                    if not data:
                        break
                    dropped += len(data)
        except (ConnectionError, TimeoutError, OSError):
            pass
        finally:
            w.close()


async def over_capacity(writer: asyncio.StreamWriter, limit: int) -> None:
    """A connection over ``max_connections``: 503 and close, without reading its request."""
    h = h11.Connection(h11.SERVER)
    body = json.dumps(error(503, f"this port holds {limit} connections already; retry",
                            "too_many_connections").obj).encode()
    data = h.send(h11.Response(status_code=503, headers=[
        (b"content-type", JSON), (b"content-length", b"%d" % len(body)), (b"retry-after", b"1"),
        (b"connection", b"close")])) + h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage())
    try:
        writer.write(data)
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    writer.close()
