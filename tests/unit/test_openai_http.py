"""The OpenAI-compatible client against a real HTTP server on loopback, whose answers each test picks."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loradeploy.errors import HttpConnectError, HttpError, HttpStatusError, HttpTimeout
from loradeploy.tools.openai_http import Client, Deadline, error_text

KEY = "sk-unit-Test-Key-987"


def _chunk(text: str | None = None, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}


class LoopbackApi:
    """A real HTTP/1.1 server on 127.0.0.1 in a thread; a subclass answers in ``get(h)`` / ``post(h)``
    with the request handler ``h`` (``send(h, ...)`` for a whole answer, ``sse_start(h)`` for a stream).
    ``release`` frees handlers a test left waiting, so ``close()`` never hangs. Also used by
    tests/integration/test_health.py."""

    def __init__(self) -> None:
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server naming)
                owner.get(self)

            def do_POST(self):  # noqa: N802
                owner.post(self)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def get(self, h: BaseHTTPRequestHandler) -> None:
        self.send(h, 404, b"{}")

    def post(self, h: BaseHTTPRequestHandler) -> None:
        self.send(h, 404, b"{}")

    @staticmethod
    def send(h: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str = "application/json") -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    @staticmethod
    def sse_start(h: BaseHTTPRequestHandler) -> None:
        # No Content-Length: the stream ends when the server closes the connection.
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True

    @staticmethod
    def read_json(h: BaseHTTPRequestHandler) -> dict:
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        return json.loads(raw) if raw else {}

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class Server(LoopbackApi):
    """Routes: GET /v1/models (JSON), GET /missing (404 in OpenAI's error shape), GET /text (not JSON),
    GET /hang (headers never come), POST /v1/chat/completions (SSE; ``stall`` stops it after the
    first chunk, ``unstreamed`` answers one JSON body instead)."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.bodies: list[dict] = []
        self.stall = False
        self.unstreamed = False
        super().__init__()

    def get(self, h) -> None:
        self.headers.append(dict(h.headers))
        if h.path == "/v1/models":
            return self.send(h, 200, json.dumps({"object": "list", "data": [{"id": "a"}, {"id": "b"}]}).encode())
        if h.path == "/text":
            return self.send(h, 200, b"hello, not json", "text/plain")
        if h.path == "/hang":
            self.release.wait(30)
            return None
        self.send(h, 404, json.dumps({"error": {"message": "no such route", "code": 404}}).encode())

    def post(self, h) -> None:
        self.headers.append(dict(h.headers))
        self.bodies.append(self.read_json(h))
        if self.unstreamed:
            answer = {"choices": [{"message": {"content": "whole"}, "finish_reason": "stop"}]}
            return self.send(h, 200, json.dumps(answer).encode())
        self.sse_start(h)
        w = h.wfile
        w.write(b": a comment line, ignored\n\n")
        w.write(f"data: {json.dumps(_chunk('hel'))}\n\n".encode())
        w.flush()
        if self.stall:
            self.release.wait(30)
            return
        w.write(b"event: ping\n\n")
        w.write(f"data:{json.dumps(_chunk('lo', 'stop'))}\n\n".encode())
        w.write(b"data: [DONE]\n\n")
        w.write(f"data: {json.dumps(_chunk('after done'))}\n\n".encode())


@pytest.fixture
def server():
    s = Server()
    try:
        yield s
    finally:
        s.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_json_request_and_model_ids(server):
    c = Client(server.url + "/v1")  # a /v1 suffix is accepted, not doubled
    r = c.get("/v1/models")
    assert r.ok and r.status == 200 and r.data["data"][0]["id"] == "a" and r.seconds >= 0
    assert r.headers["content-type"] == "application/json"
    assert c.model_ids() == ["a", "b"]
    text = c.get("/text")
    assert text.ok and text.data == "hello, not json"


def test_non_2xx_is_a_typed_error_only_when_checked(server):
    c = Client(server.url)
    r = c.get("/missing")
    assert r.status == 404 and not r.ok
    with pytest.raises(HttpStatusError) as info:
        c.get("/missing", check=True)
    e = info.value
    assert e.kind == "status" and e.status == 404 and "no such route" in e.body
    assert "GET /missing" in e.message and "HTTP 404: no such route" in e.message


def test_connection_refused_is_a_connect_error():
    port = _closed_port()
    with pytest.raises(HttpConnectError) as info:
        Client(f"http://127.0.0.1:{port}", timeout=5).model_ids()
    assert info.value.kind == "connect" and "connection refused" in info.value.message


def test_headers_that_never_come_time_out_within_the_deadline(server):
    t0 = time.monotonic()
    with pytest.raises(HttpTimeout) as info:
        Client(server.url).get("/hang", timeout=0.5)
    assert time.monotonic() - t0 < 0.5 + 1.5
    assert info.value.kind == "timeout" and "within 0.5s" in info.value.message and "GET /hang" in info.value.message


def test_sse_events_and_done(server):
    c = Client(server.url)
    with c.stream_chat({"model": "a", "messages": []}, timeout=10) as stream:
        assert stream.streamed and stream.opened_at <= time.perf_counter()
        events = list(stream)
    assert stream.done
    assert [e["choices"][0]["delta"].get("content") for e in events] == ["hel", "lo"]  # nothing after [DONE]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert server.bodies[-1]["stream"] is True and server.headers[-1]["Accept"] == "text/event-stream"


def test_server_ignoring_stream_yields_the_whole_answer_once(server):
    server.unstreamed = True
    with Client(server.url).stream_chat({"model": "a", "messages": []}, timeout=10) as stream:
        events = list(stream)
    assert not stream.streamed and stream.done
    assert events == [{"choices": [{"message": {"content": "whole"}, "finish_reason": "stop"}]}]


def test_stream_stalling_midway_times_out_within_the_deadline(server):
    server.stall = True
    got = []
    t0 = time.monotonic()
    with pytest.raises(HttpTimeout) as info:
        with Client(server.url).stream_chat({"model": "a", "messages": []}, timeout=0.8) as stream:
            for event in stream:
                got.append(event)
    assert time.monotonic() - t0 < 0.8 + 1.5
    assert len(got) == 1 and not stream.done  # the token before the stall still arrived
    assert "within 0.8s" in info.value.message and "POST /v1/chat/completions" in info.value.message


def test_authorization_header_only_with_a_key(server):
    Client(server.url).get("/v1/models")
    assert "Authorization" not in server.headers[-1]
    keyed = Client(server.url, api_key=KEY)
    keyed.get("/v1/models")
    assert server.headers[-1]["Authorization"] == f"Bearer {KEY}"
    list(keyed.stream_chat({"model": "a", "messages": []}))
    assert server.headers[-1]["Authorization"] == f"Bearer {KEY}"
    with pytest.raises(HttpError) as info:
        keyed.get("/missing", check=True)
    assert KEY not in str(info.value) and KEY not in info.value.body


def test_deadline_and_error_text():
    d = Deadline(0.05, context="GET /x on h:1")
    assert 0 < d.left() <= 0.05
    time.sleep(0.06)
    with pytest.raises(HttpTimeout, match="GET /x on h:1: no complete answer within 0.05s"):
        d.left()
    assert error_text(b'{"error": {"message": "bad  model"}}') == "bad model"
    assert error_text('{"detail": "nope"}') == "nope"
    assert error_text("plain\ntext") == "plain text"
