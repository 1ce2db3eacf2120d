"""The processes behind a served model: a llama.cpp backend and a per-model front proxy.

``python -m loradeploy.tools.serve_worker backend CONFIG.json`` runs llama-cpp-python's
OpenAI-compatible app on a loopback spare port, with the model's system-prompt rule applied.
``python -m loradeploy.tools.serve_worker proxy CONFIG.json`` owns the model's public port and
forwards each HTTP request to the backend named in its control file (re-read on SIGHUP), so a new
version is swapped in between requests and no client ever sees a refused or cut connection.

Both are started detached by loradeploy.serve and log to the model's server.log.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from .llama_safe import disable_extra_bufts

INFO_PATH = "/loradeploy/info"    # backend: what it serves (version, sha256, gguf)
PROXY_PATH = "/loradeploy/proxy"  # proxy: current backend port and requests in flight per backend
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
              b"proxy-authorization", b"te", b"trailer", b"upgrade", b"expect"}
MAX_HEAD = 64 * 1024


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- system prompt rule

def apply_system_prompt(body: bytes, prompt: str) -> bytes:
    """Give a chat request without a system message the configured one; keep a request's own."""
    try:
        data = json.loads(body)
    except ValueError:
        return body  # let the server answer the malformed request with its own error
    msgs = data.get("messages") if isinstance(data, dict) else None
    if not prompt or not isinstance(msgs, list):
        return body
    if any(isinstance(m, dict) and m.get("role") in ("system", "developer") for m in msgs):
        return body
    data["messages"] = [{"role": "system", "content": prompt}, *msgs]
    return json.dumps(data).encode()


class SystemPromptMiddleware:
    """ASGI middleware: rewrites POST /v1/chat/completions bodies before the route parses them."""

    def __init__(self, app, prompt: str):
        self.app = app
        self.prompt = prompt

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["method"] != "POST" or not self.prompt
                or scope["path"].rstrip("/") != "/v1/chat/completions"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # client went away before sending its body
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = apply_system_prompt(b"".join(chunks), self.prompt)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        scope = dict(scope, headers=headers)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


_LOG_CALLBACK = None  # kept referenced: llama.cpp holds only a C pointer to it


def _quiet_llama(verbose: bool) -> None:
    """Route llama.cpp's log to server.log: warnings and errors always (why a file will not load),
    its hundreds of info lines per load only when verbose. llama-cpp-python's own filter maps the
    ggml levels of the llama.cpp it bundles wrongly (ERROR=4 reads as DEBUG and is dropped), so
    this process installs its own callback with ggml.h's levels."""
    global _LOG_CALLBACK
    import ctypes

    import llama_cpp

    warn, error, cont = 3, 4, 5  # ggml_log_level in ggml.h
    shown = {"last": False}

    @llama_cpp.llama_log_callback
    def callback(level, text, _user):
        show = shown["last"] if level == cont else (verbose or level in (warn, error))
        shown["last"] = show
        if show:
            sys.stderr.write(text.decode("utf-8", errors="replace"))
            sys.stderr.flush()

    _LOG_CALLBACK = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def run_backend(conf: dict) -> int:
    import uvicorn
    from fastapi.responses import JSONResponse
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    if conf.get("extra_bufts") is False:
        disable_extra_bufts()
        _log("llama.cpp extra weight buffer types (AMX/repack) are off on this machine")
    t0 = time.monotonic()
    # interrupt_requests=False: overlapping requests queue instead of cutting a stream short
    server = ServerSettings(host=conf["host"], port=conf["port"], api_key=None, interrupt_requests=False)
    model = ModelSettings(model=conf["gguf"], model_alias=conf["alias"], n_ctx=conf["n_ctx"],
                          n_threads=conf["threads"], n_threads_batch=conf["threads"],
                          n_gpu_layers=conf["n_gpu_layers"], n_batch=conf["n_batch"], chat_format=None,
                          verbose=True, **conf.get("model_extra", {}))
    # verbose=True only stops llama-cpp-python from muting stdout/stderr while loading; what
    # llama.cpp logs is filtered by _quiet_llama.
    _quiet_llama(bool(conf.get("verbose", False)))
    app = create_app(server_settings=server, model_settings=[model])
    from llama_cpp.server import app as app_module

    loaded = getattr(app_module, "_llama_proxy", None)
    if loaded is not None and getattr(loaded, "_current_model", None) is not None:
        loaded._current_model.verbose = bool(conf.get("verbose", False))  # no per-request timings
    info = {k: conf.get(k) for k in ("alias", "version", "format", "sha256", "gguf")}
    info.update(pid=os.getpid(), system_prompt=bool(conf.get("system_prompt")), started_at=time.time())

    @app.get(INFO_PATH, include_in_schema=False)
    async def _info():
        return JSONResponse(info)

    app.add_middleware(SystemPromptMiddleware, prompt=conf.get("system_prompt") or "")
    _log(f"backend {conf['alias']} {conf['version']} loaded {conf['gguf']} in {time.monotonic() - t0:.1f}s; "
         f"listening on {conf['host']}:{conf['port']}")
    # Graceful shutdown on SIGTERM: uvicorn finishes requests in flight before exiting.
    uvicorn.run(app, host=conf["host"], port=conf["port"], log_level="warning", timeout_graceful_shutdown=60)
    return 0


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


class Proxy:
    def __init__(self, conf: dict):
        self.conf = conf
        self.control = Path(conf["control"])
        self.backend_port: int | None = None
        self.version: str | None = None
        self.inflight: dict[int, int] = {}
        self.served = 0
        self.reload()

    def reload(self) -> None:
        try:
            data = json.loads(self.control.read_text())
            port = int(data["backend_port"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _log(f"proxy: cannot read control file {self.control}: {exc}; keeping backend {self.backend_port}")
            return
        if port != self.backend_port:
            _log(f"proxy: backend {self.backend_port} -> {port} (version {data.get('version')})")
        self.backend_port, self.version = port, data.get("version")

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
        if target.split(b"?")[0] == PROXY_PATH.encode():
            body = json.dumps({"backend_port": self.backend_port, "version": self.version,
                               "inflight": self.inflight, "served": self.served, "pid": os.getpid()}).encode()
            cwriter.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                          + str(len(body)).encode() + b"\r\n\r\n" + body)
            await cwriter.drain()
            return keep
        if (_get(headers, b"expect") or b"").lower() == b"100-continue":
            cwriter.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        kind, length = _framing(headers)
        try:
            port, breader, bwriter = await self._open_backend()
        except OSError:
            msg = b'{"error":{"message":"no backend is reachable","type":"server_error"}}'
            cwriter.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\nconnection: close\r\n"
                          b"content-length: " + str(len(msg)).encode() + b"\r\n\r\n" + msg)
            await cwriter.drain()
            return False
        self.inflight[port] = self.inflight.get(port, 0) + 1
        try:
            out = [reqline] + [k + b": " + v for k, v in headers if k.lower() not in HOP_BY_HOP]
            out.append(b"connection: close")
            bwriter.write(b"\r\n".join(out) + b"\r\n\r\n")
            await _copy_body(creader, bwriter, kind, length)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("backend", "proxy"):
        print("usage: python -m loradeploy.tools.serve_worker backend|proxy CONFIG.json", file=sys.stderr)
        return 2
    conf = json.loads(Path(argv[1]).read_text())
    return run_backend(conf) if argv[0] == "backend" else run_proxy(conf)


if __name__ == "__main__":
    sys.exit(main())
