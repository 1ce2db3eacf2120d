"""One streamed chat answer, timed from the client's side, over the shared OpenAI-compatible client.

Every failure becomes an error string on the Reply rather than an exception: one bad answer is one
error row in the report, and the rest of the run goes on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

from ..errors import EvalError, HttpError, HttpStatusError, HttpTimeout
from ..tools.openai_http import Client, error_text


@dataclass(kw_only=True)
class ReplyStats:
    """How one answer went: its error, if any, and what was measured of it. A Reply has these fields,
    and so has the result row it becomes."""

    error: Optional[str] = None
    latency_s: Optional[float] = None
    ttft_s: Optional[float] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    finish_reason: Optional[str] = None
    gen_tps: Optional[float] = None
    prompt_tps: Optional[float] = None
    decode_s: Optional[float] = None     # first to last streamed token
    tps_source: Optional[str] = None     # "server" (reported timings) or "stream" (chunk arrival)

    def stats(self) -> dict[str, Any]:
        """Just these fields, as keywords for another ReplyStats."""
        return {f.name: getattr(self, f.name) for f in fields(ReplyStats)}


@dataclass
class Reply(ReplyStats):
    text: str = ""
    interrupted: bool = False


class Api:
    """The evaluation's view of one server: its model id, its tokenizer route, timed chat answers."""

    def __init__(self, base_url: str, timeout_s: float, *, api_key: Optional[str] = None):
        self.client = Client(base_url, api_key=api_key, timeout=timeout_s)
        self.base_url, self.host, self.port = base_url, self.client.host, self.client.port
        self.timeout_s = timeout_s
        self.model_id: Optional[str] = None
        self._tokenize: Optional[str] = None   # which tokenize route works, "" when none does

    def _body(self, messages: Sequence[dict], max_tokens: int, temperature: float) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": list(messages), "max_tokens": max_tokens, "temperature": temperature}
        if self.model_id:
            body["model"] = self.model_id
        return body

    def probe(self, timeout: float = 10.0) -> None:
        """Raise EvalError unless /v1/models answers; remember the served model id."""
        try:
            ids = self.client.model_ids(timeout=timeout)
        except HttpStatusError as exc:
            raise EvalError(f"server {self.base_url} answered HTTP {exc.status} to /v1/models") from None
        except HttpError as exc:
            raise EvalError(f"server {self.base_url} is unreachable: {exc.one_line()}") from None
        if ids:
            self.model_id = ids[0]

    def count_tokens(self, text: str) -> Optional[int]:
        """Token count from the server's tokenizer (llama-cpp-python or llama.cpp), None if neither."""
        routes = [self._tokenize] if self._tokenize else ["/extras/tokenize/count", "/tokenize"]
        if self._tokenize == "":
            return None
        for route in routes:
            body = {"input": text} if route.startswith("/extras") else {"content": text}
            if self.model_id:
                body["model"] = self.model_id
            try:
                resp = self.client.post(route, body)
            except HttpError:
                return None
            data = resp.data
            if resp.status == 200 and isinstance(data, dict):
                n = data.get("count", len(data.get("tokens") or []) if "tokens" in data else None)
                if isinstance(n, int):
                    self._tokenize = route
                    return n
        self._tokenize = ""
        return None

    def diagnose(self, messages: Sequence[dict], *, max_tokens: int, temperature: float) -> Optional[str]:
        """The server's own error for a request whose stream broke off, if it gives one unstreamed.

        llama-cpp-python drops a streaming connection on a prompt longer than the context, but
        answers the same request unstreamed with an HTTP 400 that says so.
        """
        try:
            resp = self.client.chat(self._body(messages, max_tokens, temperature))
        except HttpError:
            return None
        return f"HTTP {resp.status}: {error_text(resp.data)}" if resp.status >= 400 else None

    def chat(self, messages: Sequence[dict], *, max_tokens: int, temperature: float) -> Reply:
        body = {**self._body(messages, max_tokens, temperature), "stream_options": {"include_usage": True}}
        r = Reply()
        first = last = None
        chunks = 0
        done = False
        timings: dict = {}
        parts: list[str] = []
        t0 = time.perf_counter()
        try:
            with self.client.stream_chat(body) as stream:
                for ev in stream:
                    if "error" in ev:
                        r.error = f"server error: {error_text(ev['error'])}"
                        break
                    if ev.get("usage"):
                        r.prompt_tokens = ev["usage"].get("prompt_tokens", r.prompt_tokens)
                        r.completion_tokens = ev["usage"].get("completion_tokens", r.completion_tokens)
                    if isinstance(ev.get("timings"), dict):
                        timings = ev["timings"]
                    for ch in ev.get("choices") or []:
                        piece = (ch.get("delta") or {}).get("content") or (ch.get("text") or "")
                        if piece:
                            now = time.perf_counter()
                            first = first or now
                            last = now
                            chunks += 1
                            parts.append(piece)
                        if ch.get("finish_reason"):
                            r.finish_reason = ch["finish_reason"]
                done = stream.done
            r.text = "".join(parts)   # a request that failed mid-stream keeps no partial answer
        except HttpStatusError as exc:
            r.error = f"HTTP {exc.status}: {error_text(exc.body)}"
            r.latency_s = time.perf_counter() - t0
            return r
        except HttpTimeout:
            r.error = f"timed out after {self.timeout_s:g}s (evaluation.timeout_s)"
        except HttpError as exc:
            r.error = f"request failed: {exc.one_line()}"
        end = time.perf_counter()
        r.latency_s = end - t0
        r.ttft_s = first - t0 if first else None
        if r.error is None and not done and r.finish_reason is None:
            r.error = "the stream ended before the answer was complete (server closed the connection)"
        elif r.error is None and r.finish_reason is None:
            # llama-cpp-python ends a stream early, without a finish reason, when another request
            # arrives (interrupt_requests); the caller retries it alone.
            r.interrupted = True
        if r.completion_tokens is None and chunks:
            r.completion_tokens = chunks   # llama.cpp servers stream one token per chunk
        if first and last:
            r.decode_s = last - first
        if timings.get("predicted_per_second"):
            r.gen_tps, r.tps_source = float(timings["predicted_per_second"]), "server"
        elif r.completion_tokens and r.completion_tokens > 1 and r.decode_s:
            r.gen_tps, r.tps_source = (r.completion_tokens - 1) / r.decode_s, "stream"
        if timings.get("prompt_per_second"):
            r.prompt_tps = float(timings["prompt_per_second"])
            r.prompt_tokens = r.prompt_tokens or timings.get("prompt_n")
        return r
