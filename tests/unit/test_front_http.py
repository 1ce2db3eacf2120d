"""The front proxy's HTTP layer against a real proxy process and a tiny real HTTP backend on loopback:
framing (h11, plus what a proxy must refuse on top), limits, the backend locked to our own headers, the
non-streaming answer assembled from a stream, a leaving client cancelling at the backend, SIGHUP
re-reading both files, and /metrics in Prometheus' text format."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loradeploy.serving.assemble import assemble
from loradeploy.serving.control import Control, Limits, ProxyConf, save_control, save_proxy_conf
from loradeploy.serving.metrics import Metrics, tail_tokens

ROOT = Path(__file__).resolve().parents[2]
LIMITS = Limits(max_body=4096, max_head=8192, max_headers=50, max_connections=40, head_timeout_s=1.5,
                body_timeout_s=1.5, idle_timeout_s=1.5, backend_timeout_s=1.5)
KEY = "client-key"


def _chunk(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _event(i, **choice) -> bytes:
    return _chunk({"id": "cmpl-1", "created": 7, "model": "m", "system_fingerprint": "b1", "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "finish_reason": None, **choice}]})


class Backend:
    """A loopback HTTP/1.1 server answering like llama-server where the tests need it; it records what
    it received and whether a streaming client left before the end."""

    def __init__(self):
        self.seen: list[dict] = []
        self.left: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _json(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                outer.seen.append({"path": self.path, "headers": dict(self.headers.items())})
                self._json({"path": self.path})

            def do_POST(self):
                data = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.seen.append({"path": self.path, "headers": dict(self.headers.items()), "body": data})
                time.sleep(data.get("sleep", 0))
                if not data.get("stream"):
                    return self._json({"got": data, "usage": {"prompt_tokens": 2, "completion_tokens": 3}})
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                events = [_event(0, delta={"role": "assistant", "content": None})]
                events += [_event(i, delta={"content": f"w{i} "}, logprobs={"content": [{"token": f"w{i}"}]})
                           for i in range(data.get("words", 3))]
                events += [_event(9, delta={"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                            "function": {"name": "f", "arguments": "{\"a\""}}]}),
                           _event(9, delta={"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
                           _event(9, delta={}, finish_reason="stop") + _chunk(
                               {"id": "cmpl-1", "created": 8, "model": "m", "system_fingerprint": "b1",
                                "object": "chat.completion.chunk", "choices": [],
                                "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9},
                                "timings": {"prompt_n": 4, "predicted_n": 5}}),
                           b"data: [DONE]\n\n"]
                try:
                    for ev in events:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                        self.wfile.flush()
                        time.sleep(data.get("pace", 0))
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    outer.left.append(self.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    def __init__(self, tmp: Path, backend: Backend, env: dict | None = None):
        self.tmp, self.port = tmp, _free_port()
        self.control_path, self.conf_path = tmp / "control.json", tmp / "proxy.json"
        self.control = Control(backend_port=backend.port, version="v1", format="Q8_0", sha256="abc", gguf="/m.gguf",
                               backend="llama-server", backend_key="backend-secret")
        self.conf = ProxyConf(alias="m", host="127.0.0.1", port=self.port, control=str(self.control_path),
                              limits=LIMITS)
        save_control(self.control, self.control_path)
        save_proxy_conf(self.conf, self.conf_path)
        self.log = tmp / "proxy.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "loradeploy.serving.worker", "proxy", str(self.conf_path)],
                                     cwd=ROOT, stderr=open(self.log, "wb"), env={**os.environ, **(env or {})})
        self.wait(lambda st: True)

    def state(self) -> dict | None:
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            c.request("GET", "/loradeploy/proxy", headers={"authorization": f"Bearer {KEY}"})
            r = c.getresponse()
            return json.loads(r.read()) if r.status == 200 else None
        except OSError:
            return None

    def wait(self, ok, timeout=10) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = self.state()
            if st and ok(st):
                return st
            time.sleep(0.05)
        raise AssertionError(f"proxy state never matched: {self.state()}; log: {self.log.read_text()[-2000:]}")

    def hup(self, conf: ProxyConf | None = None, control: Control | None = None) -> dict:
        if conf:
            save_proxy_conf(conf, self.conf_path)
        if control:
            save_control(control, self.control_path)
        want = {"conf_sha256": hashlib.sha256(self.conf_path.read_bytes()).hexdigest(),
                "control_sha256": hashlib.sha256(self.control_path.read_bytes()).hexdigest()}
        os.kill(self.proc.pid, signal.SIGHUP)
        return self.wait(lambda st: all(st.get(k) == v for k, v in want.items()))


@pytest.fixture(scope="module")
def backend():
    b = Backend()
    yield b
    b.server.shutdown()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, backend):
    p = Proxy(tmp_path_factory.mktemp("front"), backend)
    yield p
    p.proc.terminate()
    p.proc.wait(10)
    assert "Traceback" not in p.log.read_text(), p.log.read_text()


def raw(port: int, data: bytes, timeout: float = 5.0, shut: bool = False) -> bytes:
    """Send ``data`` and read until the proxy closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return out


def ask(port: int, method: str, path: str, body=None, headers=None, conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    return r, r.read()


# ----------------------------------------------------------------------------- forwarding

def test_the_backend_sees_only_our_headers_and_its_own_key(proxy, backend):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    r, data = ask(proxy.port, "GET", "/health", headers={
        "authorization": "Bearer client", "cookie": "a=b", "proxy-authorization": "x", "x-forwarded-for": "1.2.3.4",
        "accept": "application/json", "user-agent": "ua/1", "te": "trailers", "upgrade": "h2c"}, conn=conn)
    assert r.status == 200 and json.loads(data) == {"path": "/health"}
    got = {k.lower(): v for k, v in backend.seen[-1]["headers"].items()}
    assert got["authorization"] == "Bearer backend-secret"
    assert set(got) == {"host", "accept", "user-agent", "authorization", "connection"}, got
    r, data = ask(proxy.port, "POST", "/tokenize", body=b'{"content": "x"}',
                  headers={"content-type": "text/plain"}, conn=conn)  # the same kept-alive connection
    got = {k.lower(): v for k, v in backend.seen[-1]["headers"].items()}
    assert got["content-type"] == "application/json" and backend.seen[-1]["body"] == {"content": "x"}
    assert r.getheader("connection") == "keep-alive"


def test_a_non_streaming_chat_is_assembled_from_a_stream(proxy, backend):
    r, data = ask(proxy.port, "POST", "/v1/chat/completions", body=json.dumps({"messages": [], "logprobs": True}))
    assert r.status == 200, data
    sent = backend.seen[-1]["body"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    got = json.loads(data)
    assert got == {
        "choices": [{"finish_reason": "stop", "index": 0, "message": {
            "role": "assistant", "content": "w0 w1 w2 ",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}, "id": "c1"}]},
            "logprobs": {"content": [{"token": "w0"}, {"token": "w1"}, {"token": "w2"}]}}],
        "created": 8, "model": "m", "system_fingerprint": "b1", "object": "chat.completion",
        "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}, "id": "cmpl-1",
        "timings": {"prompt_n": 4, "predicted_n": 5}}
    # a client that asks for a stream gets the backend's events as they are
    r, data = ask(proxy.port, "POST", "/v1/chat/completions", body=json.dumps({"messages": [], "stream": True}))
    assert r.getheader("content-type") == "text/event-stream" and data.endswith(b"data: [DONE]\n\n")
    assert "stream_options" not in backend.seen[-1]["body"]


def test_assemble_text_completions_and_errors():
    body = b"".join(_chunk({"id": "c", "created": 1, "model": "m", "system_fingerprint": "f", "object": "text_completion",
                            "choices": [{"text": t, "index": 0, "logprobs": None, "finish_reason": f}]})
                    for t, f in (("a", None), ("b", None), ("", "length"))) + b": ping\n\ndata: [DONE]\n\n"
    status, got = assemble("completions", body)
    assert status == 200 and got["choices"] == [{"text": "ab", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert got["object"] == "text_completion" and got["id"] == "c"
    status, got = assemble("chat", _chunk({"error": {"code": 400, "message": "bad", "type": "invalid_request_error"}}))
    assert status == 400 and got["error"]["message"] == "bad"
    with pytest.raises(ValueError):
        assemble("chat", b"data: {not json}\n\n")


def _leave_after(port: int, body: dict, seconds: float) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        data = json.dumps(body).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(data), data))
        time.sleep(seconds)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_at_the_backend(proxy, backend, stream):
    before = len(backend.left)
    _leave_after(proxy.port, {"messages": [], "stream": stream, "words": 40, "pace": 0.05}, 0.3)
    end = time.monotonic() + 5
    while len(backend.left) == before and time.monotonic() < end:
        time.sleep(0.05)
    assert len(backend.left) == before + 1, "the backend kept writing to a client that had left"
    proxy.wait(lambda st: st["inflight"] == {})


def test_a_silent_backend_is_504(proxy):
    t0 = time.monotonic()
    r, data = ask(proxy.port, "POST", "/tokenize", body=json.dumps({"sleep": 3}))
    assert r.status == 504 and json.loads(data)["error"]["type"] == "server_error"
    assert time.monotonic() - t0 < 3


# ----------------------------------------------------------------------------- framing

HEAD = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"


@pytest.mark.parametrize("request_bytes", [
    HEAD + b"content-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",      # CL + TE
    HEAD + b"content-length: 2\r\ncontent-length: 2\r\n\r\n{}",                                   # two CLs
    HEAD + b"content-length: 2\r\ncontent-length: 3\r\n\r\n{}",
    HEAD + b"content-length: 2, 3\r\n\r\n{}",
    HEAD + b"x-a: 1\r\n folded\r\ncontent-length: 2\r\n\r\n{}",                                   # obs-fold
    HEAD + b"transfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",                            # bad chunk sizes
    HEAD + b"transfer-encoding: chunked\r\n\r\n-5\r\n{}\r\n0\r\n\r\n",
    b"POST /v1/completions HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",  # chunked on 1.0
    HEAD + b"x-a: a\x00b\r\ncontent-length: 2\r\n\r\n{}",                                         # NUL in the head
    b"GET /health\x00 HTTP/1.1\r\nhost: x\r\n\r\n",
    HEAD + b"transfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",                                      # TLS on the plain port
])
def test_smuggling_and_malformed_heads_are_refused_and_closed(proxy, request_bytes):
    reply = raw(proxy.port, request_bytes + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:300]
    assert reply.count(b"HTTP/1.1 ") == 1 and b"connection: close" in reply.lower(), "nothing after a refusal"
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("request_bytes", [
    b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(10_000)) + b"\r\n",
    b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(60)) + b"\r\n",
])
def test_large_heads_and_many_headers_are_431(proxy, request_bytes):
    assert raw(proxy.port, request_bytes).startswith(b"HTTP/1.1 431 ")


def test_bodies_over_the_cap_are_413_without_reading_them(proxy):
    t0 = time.monotonic()
    reply = raw(proxy.port, HEAD + b"content-length: 10000000000\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 413 ") and time.monotonic() - t0 < 1.0
    reply = raw(proxy.port, HEAD + b"transfer-encoding: chunked\r\n\r\n1000\r\n" + b" " * 0x1000 + b"\r\n1\r\n ")
    assert reply.startswith(b"HTTP/1.1 413 ") and b"connection: close" in reply


def test_http10_gets_no_chunks_and_head_gets_no_body(proxy):
    body = json.dumps({"messages": [], "stream": True}).encode()
    reply = raw(proxy.port, b"POST /v1/chat/completions HTTP/1.0\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding" not in head.lower()
    assert rest.startswith(b"data: ") and rest.endswith(b"data: [DONE]\n\n")
    reply = raw(proxy.port, b"HEAD /loradeploy/info HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 405 ") and reply.endswith(b"\r\n\r\n")


def test_pipelined_requests_are_answered_in_order(proxy):
    reply = raw(proxy.port, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nhost: x\r\n"
                            b"connection: close\r\n\r\n")
    assert reply.count(b"HTTP/1.1 200 ") == 2 and reply.index(b'"/health"') < reply.index(b'"/v1/models"')


# ----------------------------------------------------------------------------- limits

def test_slow_and_idle_clients_are_closed_while_others_are_served(proxy):
    socks = []
    for i in range(30):
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nhost")  # a head that never ends
        socks.append(s)
    r, _ = ask(proxy.port, "GET", "/health")
    assert r.status == 200
    t0 = time.monotonic()
    for s in socks:
        data = s.recv(4096)
        assert data.startswith(b"HTTP/1.1 408 "), data
        s.close()
    assert time.monotonic() - t0 < LIMITS.head_timeout_s + 2
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:  # idle after an answer
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        time.sleep(LIMITS.idle_timeout_s + 1)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data.count(b"HTTP/1.1 ") == 1, "an idle kept-alive connection is closed"


def test_connections_over_the_limit_get_503(proxy):
    socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.3)
        reply = raw(proxy.port, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
    finally:
        for s in socks:
            s.close()
    proxy.wait(lambda st: True)
    r, _ = ask(proxy.port, "GET", "/health")
    assert r.status == 200


# ----------------------------------------------------------------------------- files and metrics

def test_sighup_rereads_both_files_and_keeps_state_on_a_bad_file(proxy, backend):
    with_key = replace(proxy.conf, api_key_sha256=hashlib.sha256(KEY.encode()).hexdigest())
    st = proxy.hup(conf=with_key)
    assert st["backend_port"] == backend.port and st["pid"] == proxy.proc.pid
    try:
        r, data = ask(proxy.port, "GET", "/metrics")
        assert r.status == 401 and r.getheader("www-authenticate") == "Bearer"
        r, data = ask(proxy.port, "GET", "/v1/models", headers={"authorization": f"Bearer {KEY}"})
        assert r.status == 200
        r, _ = ask(proxy.port, "POST", "/v1/completions", body=b"{}", headers={"authorization": "Bearer wrong"})
        assert r.status == 401
        good = proxy.state()
        proxy.control_path.write_text(json.dumps({"backend_port": "nope"}))
        os.kill(proxy.proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        st = proxy.state()
        assert (st["backend_port"], st["control_sha256"]) == (good["backend_port"], good["control_sha256"])
        assert "backend_port must be an integer" in proxy.log.read_text()
        r, _ = ask(proxy.port, "GET", "/health", headers={"authorization": f"Bearer {KEY}"})
        assert r.status == 200
    finally:
        proxy.hup(conf=proxy.conf, control=proxy.control)
    r, _ = ask(proxy.port, "GET", "/health")
    assert r.status == 200, "the key is gone again"


_SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? '
                     r'(-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?|[+-]Inf|NaN)$')


def test_metrics_are_prometheus_text(proxy):
    ask(proxy.port, "POST", "/v1/chat/completions", body=json.dumps({"messages": []}))
    ask(proxy.port, "GET", "/nope")
    r, data = ask(proxy.port, "GET", "/metrics")
    assert r.status == 200 and r.getheader("content-type").startswith("text/plain; version=0.0.4")
    text = data.decode()
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or _SAMPLE.match(line), line
    assert 'loradeploy_requests_total{route="/v1/chat/completions",code="200"}' in text
    assert 'loradeploy_requests_total{route="other",code="404"} ' in text
    assert 'loradeploy_request_seconds_bucket{route="/v1/chat/completions",le="+Inf"}' in text
    assert 'loradeploy_served_info{version="v1",format="Q8_0",sha256="abc",mode="merged"} 1' in text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["loradeploy_generated_tokens_total"] >= 5 and values["loradeploy_prompt_tokens_total"] >= 4


def test_metrics_render_and_tail_counts():
    m = Metrics()
    m.observe("/v1/models", 200, 0.01)
    m.observe("/v1/models", 200, 1000)
    m.tokens((3, 4))
    text = m.render(2, {"version": 'v"1', "format": "Q4_K_M", "sha256": "s", "mode": "adapter"})
    assert 'loradeploy_request_seconds_bucket{route="/v1/models",le="0.05"} 1' in text
    assert 'loradeploy_request_seconds_bucket{route="/v1/models",le="600.0"} 1' in text
    assert 'loradeploy_request_seconds_bucket{route="/v1/models",le="+Inf"} 2' in text
    assert 'loradeploy_request_seconds_count{route="/v1/models"} 2' in text
    assert "loradeploy_requests_in_flight 2" in text and 'version="v\\"1"' in text
    assert text.endswith("\n")
    m.observe("/health", 200, 0.00001)  # a sum printed with an exponent is still a sample
    assert all(_SAMPLE.match(line) for line in m.render(0, {}).splitlines() if not line.startswith("#"))
    tail = [b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9}}\n\n', b"data: [DONE]\n\n"]
    assert tail_tokens(tail) == (7, 9)
    assert tail_tokens([b'data: {"choices": [{"finish_reason": "stop"}], "timings": {"prompt_n": 1, "predicted_n": 2}}'
                        b"\n\n"]) == (1, 2)
    assert tail_tokens([b"data: [DONE]\n\n"]) is None


def test_expect_100_continue_and_info_without_secrets(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:  # curl-style Expect
        s.sendall(b"POST /tokenize HTTP/1.1\r\nhost: x\r\ncontent-length: 7\r\nexpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
        s.sendall(b'{"a":1}')
        reply = b""
        while b"}}" not in reply:
            reply += s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b'"got": {"a": 1}' in reply
    r, data = ask(proxy.port, "GET", "/loradeploy/info")
    info = json.loads(data)
    assert info["version"] == "v1" and info["backend"] == "llama-server" and "backend-secret" not in data.decode()


def test_no_reachable_backend_is_502(proxy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proxy.hup(control=replace(proxy.control, backend_port=dead))
    try:
        r, data = ask(proxy.port, "GET", "/health")
        assert r.status == 502 and json.loads(data)["error"]["type"] == "server_error"
    finally:
        proxy.hup(control=proxy.control)


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_the_proxy_runs_on_either_event_loop(tmp_path, backend, loop):
    """uvloop where installed (the default), asyncio's own loop as the fallback: the same answers on both."""
    p = Proxy(tmp_path, backend, env={"LORADEPLOY_EVENT_LOOP": loop})
    try:
        st = p.state()
        try:
            import uvloop  # noqa: F401
            want = "uvloop" if loop == "auto" else "asyncio"
        except ImportError:
            want = "asyncio"
        assert st["event_loop"] == want, st
        out = raw(p.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode()
                  + b"\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
        assert out.startswith(b"HTTP/1.1 200"), out[:300]
        out = raw(p.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                  b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400"), out[:300]
    finally:
        p.proc.terminate()
        p.proc.wait(10)
    assert "Traceback" not in p.log.read_text()
