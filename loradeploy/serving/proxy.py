"""The front proxy worker: owns a model's public port and forwards each HTTP request to the backend
named in its control file (re-read on SIGHUP), so a new version is swapped in between requests and
no client ever sees a refused or cut connection. With an api key configured, every route needs
``Authorization: Bearer KEY`` (compared by sha256, so only the hash is on disk).

What is the same for every kind of backend lives here, once: ``/loradeploy/info`` (what the port
serves, from the control file the switch writes) and the model's system-prompt rule on
``POST /v1/chat/completions`` (llama-server has neither).

In adapter mode (the control file names a ``lora`` selection) several ports share one llama-server
that holds every adapter on one base: the proxy writes its model's ``lora`` selection into every
generation request (a client cannot pick another model's adapter through this port), answers
``/v1/models`` with its own model, and refuses ``POST /lora-adapters`` (it would change the
adapters' global scales under every other port)."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import sys
import time
from pathlib import Path

from .routes import INFO_PATH, PROXY_PATH

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
              b"proxy-authorization", b"te", b"trailer", b"upgrade", b"expect"}
MAX_HEAD = 64 * 1024
CHAT_PATH = b"/v1/chat/completions"
# Every llama-server route that generates: in adapter mode each gets the port's lora selection.
GEN_PATHS = {b"/v1/chat/completions", b"/chat/completions", b"/v1/completions", b"/completions",
             b"/completion", b"/infill"}
INFO_KEYS = ("version", "format", "sha256", "gguf", "backend", "backend_port", "switched_at", "mode", "base_gguf",
             "base_sha256", "lora")


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- system prompt rule

def apply_system_prompt(body: bytes, prompt: str, lora: list | None = None) -> bytes:
    """Give a chat request without a system message the configured one (keep a request's own), and
    in adapter mode set the port's ``lora`` selection, whatever the request asked for."""
    try:
        data = json.loads(body)
    except ValueError:
        return body  # let the server answer the malformed request with its own error
    if not isinstance(data, dict):
        return body
    changed = False
    if lora is not None:
        data["lora"], changed = lora, True
    msgs = data.get("messages")
    if prompt and isinstance(msgs, list) and not any(
            isinstance(m, dict) and m.get("role") in ("system", "developer") for m in msgs):
        data["messages"], changed = [{"role": "system", "content": prompt}, *msgs], True
    return json.dumps(data).encode() if changed else body


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
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
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


async def _read_body(reader, kind: str, length: int) -> bytes:
    """A whole request body, de-chunked: to rewrite it, or to drop a refused one so the connection
    stays usable for the next request."""
    if kind == "length":
        return await reader.readexactly(length)
    parts = []
    while kind == "chunked":
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers end with an empty line
                pass
            break
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
        path = target.split(b"?")[0]
        if not self.authorized(headers):
            await _read_body(creader, *_framing(headers))
            msg = (b'{"error":{"message":"missing or wrong API key: send Authorization: Bearer KEY",'
                   b'"type":"invalid_request_error","code":"invalid_api_key"}}')
            cwriter.write(_json_reply(b"401 Unauthorized", msg, keep, b"www-authenticate: Bearer\r\n"))
            await cwriter.drain()
            self.refused += 1
            return keep
        if path in (PROXY_PATH.encode(), INFO_PATH.encode()):
            await _read_body(creader, *_framing(headers))
            if path == INFO_PATH.encode():
                obj = {"alias": self.conf.get("alias"), **{k: self.serving.get(k) for k in INFO_KEYS},
                       "system_prompt": bool(self.serving.get("system_prompt")), "proxy_pid": os.getpid()}
            else:
                obj = {"backend_port": self.backend_port, "version": self.version, "inflight": self.inflight,
                       "served": self.served, "refused": self.refused, "pid": os.getpid()}
            cwriter.write(_json_reply(b"200 OK", obj, keep))
            await cwriter.drain()
            return keep
        if (_get(headers, b"expect") or b"").lower() == b"100-continue":
            cwriter.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = None
        prompt = self.serving.get("system_prompt") or ""
        lora = self.serving.get("lora")
        route = path.rstrip(b"/")
        if lora is not None and (route == b"/v1/models" or route == b"/lora-adapters" and method == b"POST"):
            await _read_body(creader, *_framing(headers))
            if route == b"/v1/models":
                obj = {"object": "list", "data": [{"id": self.conf.get("alias"), "object": "model",
                                                   "owned_by": "loradeploy", "created": int(self.serving.get(
                                                       "switched_at") or 0)}]}
                cwriter.write(_json_reply(b"200 OK", obj, keep))
            else:
                msg = (b'{"error":{"message":"this port serves one adapter of a shared server: its adapters '
                       b'are set by loradeploy deploy","type":"invalid_request_error"}}')
                cwriter.write(_json_reply(b"403 Forbidden", msg, keep))
            await cwriter.drain()
            return keep
        if method == b"POST" and (prompt and route == CHAT_PATH or lora is not None and route in GEN_PATHS):
            body = apply_system_prompt(await _read_body(creader, *_framing(headers)),
                                       prompt if route == CHAT_PATH else "", lora)
            headers = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"transfer-encoding")]
            headers.append((b"content-length", str(len(body)).encode()))
        kind, length = _framing(headers)
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
            if body is None:
                await _copy_body(creader, bwriter, kind, length)
            else:
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


