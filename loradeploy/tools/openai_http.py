"""The one HTTP client for OpenAI-compatible servers (ours, llama.cpp's, LM Studio's, Ollama's).

Plain http.client: no dependency, and every read gets the time left on one overall deadline, so
a server that accepts the connection and then stalls mid-stream cannot hang a caller. Failures are
typed (connect, timeout, status, protocol) and carry a one-line message; an ``Authorization:
Bearer`` key is sent when given and never appears in a message.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional
from urllib.parse import urlsplit

from ..errors import HttpConnectError, HttpError, HttpStatusError, HttpTimeout, InputError

MAX_BODY = 32 * 1024 * 1024
MAX_LINE = 4 * 1024 * 1024


class Deadline:
    """Seconds left on one overall budget; ``left()`` raises HttpTimeout once it is spent.

    ``context`` (e.g. "GET /v1/models on host:port") leads the message, so a caller can show the
    error as it is without saying again which request it was."""

    def __init__(self, seconds: float, what: str = "answer", *, context: str = ""):
        self.seconds = float(seconds)
        self.what = what
        self.context = context
        self.end = time.monotonic() + self.seconds

    def say(self, text: str) -> str:
        return f"{self.context}: {text}" if self.context else text

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise HttpTimeout(self.say(f"no complete {self.what} within {self.seconds:g}s"))
        return left


@dataclass
class Response:
    status: int
    data: Any               # decoded JSON, or the text when the body is not JSON
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def error_text(body: Any) -> str:
    """The human part of an error body: OpenAI's ``{"error": {"message"}}``, FastAPI's ``detail``."""
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            pass
    if isinstance(body, dict):
        inner = body.get("error", body.get("detail", body.get("message", body)))
        if isinstance(inner, dict):
            inner = inner.get("message", inner)
        body = inner
    return " ".join(str(body).split())[:300]


class Client:
    """One server: ``Client("http://127.0.0.1:5000", api_key=...)``; a ``/v1`` suffix is accepted."""

    def __init__(self, base_url: str, *, api_key: Optional[str] = None, timeout: float = 30.0):
        u = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise InputError(f"bad server URL {base_url!r}", hint="use http://host:port")
        self.base_url = base_url
        self.scheme, self.host = u.scheme, u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        prefix = u.path.rstrip("/")
        self.prefix = prefix[:-3] if prefix.endswith("/v1") else prefix
        self.timeout = float(timeout)
        self._api_key = api_key

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def _deadline(self, method: str, path: str, timeout: Optional[float], what: str = "answer") -> Deadline:
        return Deadline(self.timeout if timeout is None else timeout, what,
                        context=f"{method} {path} on {self.where}")

    # ------------------------------------------------------------------ plumbing

    def _headers(self, has_body: bool, stream: bool, extra: Optional[Mapping[str, str]]) -> dict[str, str]:
        h = {"Accept": "text/event-stream" if stream else "application/json"}
        if has_body:
            h["Content-Type"] = "application/json"
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        h.update(extra or {})
        return h

    def _open(self, method: str, path: str, body: Any, deadline: Deadline, *, stream: bool = False,
              headers: Optional[Mapping[str, str]] = None):
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        conn = cls(self.host, self.port, timeout=deadline.left())
        try:
            conn.request(method, self.prefix + path, body=data,
                         headers=self._headers(data is not None, stream, headers))
            # Kept: getresponse() drops conn.sock when the server closes after answering, but the
            # response still reads from this socket, and every read needs the time left.
            sock = conn.sock
            sock.settimeout(deadline.left())
            resp = conn.getresponse()
        except socket.timeout:
            conn.close()
            raise HttpTimeout(deadline.say(f"no answer within {deadline.seconds:g}s")) from None
        except ConnectionRefusedError:
            conn.close()
            raise HttpConnectError(f"{self.where}: connection refused (nothing listens there)") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise HttpConnectError(deadline.say(f"{type(exc).__name__}: {exc}")) from None
        except HttpError:
            conn.close()
            raise
        return conn, resp, sock

    @staticmethod
    def _read_all(sock, resp, deadline: Deadline) -> bytes:
        chunks, total = [], 0
        try:
            while True:
                sock.settimeout(deadline.left())
                part = resp.read1(65536)
                if not part:
                    return b"".join(chunks)
                chunks.append(part)
                total += len(part)
                if total > MAX_BODY:
                    raise HttpError(deadline.say(f"answer larger than {MAX_BODY >> 20} MiB"), kind="protocol")
        except socket.timeout:
            raise HttpTimeout(deadline.say(f"answer not finished within {deadline.seconds:g}s")) from None
        except (OSError, http.client.HTTPException) as exc:
            raise HttpError(deadline.say(f"answer cut off: {type(exc).__name__}: {exc}"), kind="protocol") from None

    # ------------------------------------------------------------------ JSON requests

    def request(self, method: str, path: str, body: Any = None, *, timeout: Optional[float] = None,
                headers: Optional[Mapping[str, str]] = None, check: bool = False) -> Response:
        """One request; ``check=True`` raises HttpStatusError on a status outside 2xx."""
        t0 = time.monotonic()
        deadline = self._deadline(method, path, timeout)
        conn, resp, sock = self._open(method, path, body, deadline, headers=headers)
        try:
            raw = self._read_all(sock, resp, deadline)
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = raw.decode("utf-8", "replace")
        out = Response(resp.status, data, {k.lower(): v for k, v in resp.getheaders()}, time.monotonic() - t0)
        if check and not out.ok:
            raise HttpStatusError(f"{deadline.context} answered HTTP {resp.status}: {error_text(raw)}",
                                  status=resp.status, body=raw[:2000].decode("utf-8", "replace"))
        return out

    def get(self, path: str, **kw) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any, **kw) -> Response:
        return self.request("POST", path, body, **kw)

    def model_ids(self, *, timeout: Optional[float] = None) -> list[str]:
        data = self.get("/v1/models", timeout=timeout, check=True).data
        items = data.get("data") if isinstance(data, dict) else None
        return [m.get("id") for m in items or [] if isinstance(m, dict)]

    def chat(self, body: dict, *, timeout: Optional[float] = None) -> Response:
        """An unstreamed chat completion (``body`` as the OpenAI API takes it)."""
        return self.post("/v1/chat/completions", {**body, "stream": False}, timeout=timeout)

    # ------------------------------------------------------------------ streaming

    def stream(self, path: str, body: dict, *, timeout: Optional[float] = None) -> "Stream":
        """Open a server-sent-event stream; iterate the returned Stream for decoded ``data:`` events."""
        deadline = self._deadline("POST", path, timeout, "stream")
        t0 = time.perf_counter()
        conn, resp, sock = self._open("POST", path, {**body, "stream": True}, deadline, stream=True)
        if resp.status != 200:
            try:
                raw = self._read_all(sock, resp, deadline)
            finally:
                conn.close()
            raise HttpStatusError(f"{deadline.context} answered HTTP {resp.status}: {error_text(raw)}",
                                  status=resp.status, body=raw[:2000].decode("utf-8", "replace"))
        return Stream(conn, resp, sock, deadline, t0)

    def stream_chat(self, body: dict, *, timeout: Optional[float] = None) -> "Stream":
        return self.stream("/v1/chat/completions", body, timeout=timeout)


class Stream:
    """Events of one SSE answer. ``done`` turns true at ``[DONE]``; ``opened_at`` is perf_counter()
    when the request was sent, so time-to-first-token can be measured from the caller's side.

    A server that ignores ``"stream": true`` answers one JSON body instead: then ``streamed`` is
    false and the iteration yields that body once (a chat completion, not a chunk), so a caller
    can still use the answer but knows it has no time to first token."""

    def __init__(self, conn, resp, sock, deadline: Deadline, opened_at: float):
        self._conn, self._resp, self._sock, self._deadline = conn, resp, sock, deadline
        self.opened_at = opened_at
        self.done = False
        self.headers = {k.lower(): v for k, v in resp.getheaders()}
        self.streamed = not self.headers.get("content-type", "").startswith("application/json")

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def __iter__(self) -> Iterator[dict]:
        if not self.streamed:
            yield self._whole()
            return
        say = self._deadline.say
        try:
            while True:
                self._sock.settimeout(self._deadline.left())
                line = self._resp.readline(MAX_LINE)
                self._deadline.left()
                if not line:
                    return
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.done = True
                    return
                try:
                    event = json.loads(payload)
                except ValueError:
                    raise HttpError(say(f"stream sent a line that is not JSON: {payload[:120]!r}"),
                                    kind="protocol") from None
                if isinstance(event, dict):
                    yield event
        except socket.timeout:
            raise HttpTimeout(say(f"stream not finished within {self._deadline.seconds:g}s")) from None
        except (OSError, http.client.HTTPException) as exc:
            raise HttpError(say(f"stream cut off: {type(exc).__name__}: {exc}"), kind="protocol") from None

    def _whole(self) -> dict:
        raw = Client._read_all(self._sock, self._resp, self._deadline)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise HttpError(self._deadline.say(f"answer is not a JSON object: {raw[:120]!r}"), kind="protocol")
        self.done = True
        return body
