"""The front proxy worker: owns a model's public port and forwards each HTTP request to the backend
named in its control file (re-read on SIGHUP), so a new version is swapped in between requests and
no client ever sees a refused or cut connection. With an api key configured, every route needs
``Authorization: Bearer KEY`` (compared by sha256, so only the hash is on disk).

What is the same for every kind of backend lives here, once: ``/loradeploy/info`` (what the port
serves, from the control file the switch writes) and the model's system-prompt rule on
``POST /v1/chat/completions`` (llama-server has neither).

What a request may reach is ``policy.route``'s: an allow-list of normalised paths, and strictly parsed
JSON bodies that the backend receives re-serialised, never as the client's bytes. In adapter mode (the
control file names a ``lora`` selection) several ports share one llama-server that holds every adapter
on one base: the port's ``lora`` selection is set on every generation request, ``/v1/models`` answers
with the port's own model, and adapter listings and scale changes are not reachable at all. A body is
capped (``max_body`` in the proxy's conf, 8 MiB by default): over it, 413 and the connection closes
before the rest is read."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import sys
import time
from http import HTTPStatus
from pathlib import Path

from .policy import MAX_BODY, Forward, PortInfo, Reply, error, route

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
              b"proxy-authorization", b"te", b"trailer", b"upgrade", b"expect"}
MAX_HEAD = 64 * 1024
INFO_KEYS = ("version", "format", "sha256", "gguf", "backend", "backend_port", "switched_at", "mode", "base_gguf",
             "base_sha256", "lora")


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- front proxy

class _HTTPError(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _HTTPError("incomplete request head") from None
        return None  # clean close between requests
    except asyncio.LimitOverrunError:
        raise _HTTPError("request head too large") from None
    return head


def _parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    lines = head[:-4].split(b"\r\n")
    out = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise _HTTPError("malformed header line")
        out.append((name.strip(), value.strip()))
    return lines[0], out


def _get(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[str, int]:
    te = _get(headers, b"transfer-encoding")
    if te is not None and b"chunked" in te.lower():
        return "chunked", 0
    cl = _get(headers, b"content-length")
    if cl is not None:
        try:
            return "length", int(cl)
        except ValueError:
            raise _HTTPError("bad content-length") from None
    return "none", 0


async def _copy_body(reader, writer, kind: str, length: int) -> None:
    """Copy one message body verbatim, flushing as it arrives (server-sent events stay live)."""
    if kind == "length":
        left = length
        while left:
            data = await reader.read(min(left, 65536))
            if not data:
                raise _HTTPError("body ended early")
            writer.write(data)
            await writer.drain()
            left -= len(data)
    elif kind == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            writer.write(size_line)
            size = _chunk_size(size_line)
            if size == 0:
                while True:  # trailers end with an empty line
                    line = await reader.readuntil(b"\r\n")
                    writer.write(line)
                    if line == b"\r\n":
                        break
                await writer.drain()
                return
            writer.write(await reader.readexactly(size + 2))
            await writer.drain()
    elif kind == "eof":
        while True:
            data = await reader.read(65536)
            if not data:
                return
            writer.write(data)
            await writer.drain()


class _TooLarge(Exception):
    pass


def _chunk_size(line: bytes) -> int:
    try:
        size = int(line.split(b";")[0].strip(), 16)
    except ValueError:
        raise _HTTPError("bad chunk size") from None
    if size < 0:
        raise _HTTPError("bad chunk size")
    return size


async def _read_body(reader, kind: str, length: int, cap: int) -> bytes:
    """A whole request body, de-chunked: to check and rewrite it, or to drop a refused one so the
    connection stays usable for the next request. Over ``cap`` bytes: _TooLarge, before reading past it."""
    if kind == "length":
        if length > cap:
            raise _TooLarge
        return await reader.readexactly(length)
    parts, total = [], 0
    while kind == "chunked":
        size = _chunk_size(await reader.readuntil(b"\r\n"))
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers end with an empty line
                pass
            break
        total += size
        if total > cap:
            raise _TooLarge
        parts.append((await reader.readexactly(size + 2))[:-2])
    return b"".join(parts)


def _json_reply(status: bytes, obj, keep: bool, extra: bytes = b"") -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n" + extra + b"content-length: "
            + str(len(body)).encode() + b"\r\n" + (b"" if keep else b"connection: close\r\n") + b"\r\n" + body)


class Proxy:
    def __init__(self, conf: dict):
        self.conf = conf
        self.control = Path(conf["control"])
        self.backend_port: int | None = None
        self.version: str | None = None
        self.serving: dict = {}       # the control file: what the port serves, and its system prompt
        self.inflight: dict[int, int] = {}
        self.served = 0
        self.refused = 0
        self.reload()

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        want = self.conf.get("api_key_sha256")
        if not want:
            return True
        got = _get(headers, b"authorization") or b""
        scheme, _, token = got.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        return hmac.compare_digest(hashlib.sha256(token.strip()).hexdigest(), want)

    def reload(self) -> None:
        try:
            data = json.loads(self.control.read_text())
            port = int(data["backend_port"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _log(f"proxy: cannot read control file {self.control}: {exc}; keeping backend {self.backend_port}")
            return
        if port != self.backend_port:
            _log(f"proxy: backend {self.backend_port} -> {port} (version {data.get('version')})")
        self.backend_port, self.version, self.serving = port, data.get("version"), data

    async def _open_backend(self):
        """Connect to the current backend; a refused connect re-reads the control file and retries,
        covering the moment between a switch and the old backend closing its socket."""
        deadline = time.monotonic() + float(self.conf.get("connect_retry_s", 5))
        while True:
            port = self.backend_port
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                return port, r, w
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
                self.reload()

    async def handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            while await self._one(creader, cwriter):
                pass
        except (_HTTPError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            _log(f"proxy: connection dropped: {type(exc).__name__}: {exc}")
        finally:
            cwriter.close()

    def port_info(self) -> PortInfo:
        s = self.serving
        return PortInfo(
            alias=self.conf.get("alias"), system_prompt=s.get("system_prompt") or "", lora=s.get("lora"),
            created=int(s.get("switched_at") or 0), embeddings=bool(s.get("embeddings")),
            max_body=int(self.conf.get("max_body") or MAX_BODY),
            info={"alias": self.conf.get("alias"), **{k: s.get(k) for k in INFO_KEYS},
                  "system_prompt": bool(s.get("system_prompt")), "proxy_pid": os.getpid()},
            proxy={"backend_port": self.backend_port, "version": self.version, "inflight": self.inflight,
                   "served": self.served, "refused": self.refused, "pid": os.getpid()})

    async def _reply(self, cwriter, reply: Reply, keep: bool) -> bool:
        extra = b"".join(k.encode() + b": " + v.encode() + b"\r\n" for k, v in reply.headers)
        status = f"{reply.status} {HTTPStatus(reply.status).phrase}".encode()
        cwriter.write(_json_reply(status, reply.obj, keep, extra))
        await cwriter.drain()
        return keep

    async def _one(self, creader, cwriter) -> bool:
        head = await _read_head(creader)
        if head is None:
            return False
        reqline, headers = _parse_head(head)
        parts = reqline.split(b" ")
        if len(parts) != 3:
            raise _HTTPError("malformed request line")
        method, target, proto = parts
        conn = (_get(headers, b"connection") or b"").lower()
        keep = (b"close" not in conn) if proto == b"HTTP/1.1" else (b"keep-alive" in conn)
        info = self.port_info()
        try:
            if not self.authorized(headers):
                self.refused += 1
                denied = error(401, "missing or wrong API key: send Authorization: Bearer KEY", "invalid_api_key",
                               [("www-authenticate", "Bearer")])
                try:  # a refused body is dropped, and not read at all past the cap: the connection closes
                    await _read_body(creader, *_framing(headers), info.max_body)
                except _TooLarge:
                    return await self._reply(cwriter, denied, False)
                return await self._reply(cwriter, denied, keep)
            kind, length = _framing(headers)
            if kind == "length" and length > info.max_body:
                raise _TooLarge
            if kind != "none" and (_get(headers, b"expect") or b"").lower() == b"100-continue":
                cwriter.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await _read_body(creader, kind, length, info.max_body)
        except _TooLarge:
            return await self._reply(cwriter, error(413, f"the request body is over {info.max_body} bytes",
                                                    "body_too_large"), False)
        except _HTTPError as exc:
            return await self._reply(cwriter, error(400, str(exc), "bad_request"), False)
        decided = route(method.decode("latin-1"), target, headers, body, info)
        if isinstance(decided, Reply):
            return await self._reply(cwriter, decided, keep)
        assert isinstance(decided, Forward)
        reqline = f"{decided.method} {decided.path} HTTP/1.1".encode()
        headers = [(k, v) for k, v in headers
                   if k.lower() not in (b"content-length", b"transfer-encoding", b"content-type")]
        if decided.body is not None:
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", str(len(decided.body)).encode())]
        body = decided.body
        try:
            port, breader, bwriter = await self._open_backend()
        except OSError:
            msg = b'{"error":{"message":"no backend is reachable","type":"server_error"}}'
            cwriter.write(_json_reply(b"502 Bad Gateway", msg, False))
            await cwriter.drain()
            return False
        self.inflight[port] = self.inflight.get(port, 0) + 1
        try:
            out = [reqline] + [k + b": " + v for k, v in headers if k.lower() not in HOP_BY_HOP]
            out.append(b"connection: close")
            bwriter.write(b"\r\n".join(out) + b"\r\n\r\n")
            if body is not None:
                bwriter.write(body)
            await bwriter.drain()
            rhead = await breader.readuntil(b"\r\n\r\n")
            status, rheaders = _parse_head(rhead)
            code = int(status.split(b" ")[1]) if len(status.split(b" ")) > 1 else 502
            rkind, rlen = _framing(rheaders)
            if method == b"HEAD" or code in (204, 304) or 100 <= code < 200:
                rkind = "none"
            elif rkind == "none":
                rkind, keep = "eof", False  # body ends when the backend closes: so must we
            out = [status] + [k + b": " + v for k, v in rheaders if k.lower() not in HOP_BY_HOP]
            out.append(b"connection: keep-alive" if keep else b"connection: close")
            cwriter.write(b"\r\n".join(out) + b"\r\n\r\n")
            await _copy_body(breader, cwriter, rkind, rlen)
            self.served += 1
            return keep
        finally:
            self.inflight[port] -= 1
            if not self.inflight[port]:
                del self.inflight[port]
            bwriter.close()


async def _serve_proxy(conf: dict) -> None:
    proxy = Proxy(conf)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, proxy.reload)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = await asyncio.start_server(proxy.handle, conf["host"], conf["port"], limit=MAX_HEAD,
                                        reuse_address=True)
    _log(f"proxy for {conf['alias']} listening on {conf['host']}:{conf['port']} -> backend {proxy.backend_port}")
    async with server:
        await stop.wait()
        server.close()
        # Let requests in flight finish (bounded) before the process exits.
        end = time.monotonic() + 30
        while proxy.inflight and time.monotonic() < end:
            await asyncio.sleep(0.05)
    _log("proxy stopped")


def run_proxy(conf: dict) -> int:
    try:
        asyncio.run(_serve_proxy(conf))
    except OSError as exc:
        _log(f"proxy cannot listen on {conf['host']}:{conf['port']}: {exc}")
        return 3
    return 0


