"""The non-streaming answer a client asked for, built from the events of the stream the front door asked
the backend for instead (``policy.Forward.assemble``), in llama-server's own non-streaming shape:

- chat: ``id``, ``object: chat.completion``, ``created``, ``model``, ``system_fingerprint``, one choice per
  index with its ``message`` (role, content, reasoning_content, tool_calls merged by index), its
  ``finish_reason`` and, when asked for, ``logprobs`` (the chunks' contents concatenated); ``usage``
  and ``timings`` from the last events;
- completions: the same with ``object: text_completion`` and each choice's ``text``.

A stream that carries an error event gives that error (HTTP 500, as llama-server answers it)."""
from __future__ import annotations

import json
from typing import Any

OBJECT = {"chat": "chat.completion", "completions": "text_completion"}


class _Choice:
    def __init__(self, index: int):
        self.index = index
        self.role = "assistant"
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tools: dict[int, dict] = {}
        self.logprobs: list | None = None
        self.finish_reason = None

    def add(self, ch: dict) -> None:
        if ch.get("finish_reason") is not None:
            self.finish_reason = ch["finish_reason"]
        lp = ch.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            self.logprobs = (self.logprobs or []) + lp["content"]
        if isinstance(ch.get("text"), str):
            self.content.append(ch["text"])
        delta = ch.get("delta")
        if not isinstance(delta, dict):
            return
        if isinstance(delta.get("role"), str):
            self.role = delta["role"]
        if isinstance(delta.get("content"), str):
            self.content.append(delta["content"])
        if isinstance(delta.get("reasoning_content"), str):
            self.reasoning.append(delta["reasoning_content"])
        for tc in delta.get("tool_calls") or ():
            if isinstance(tc, dict):
                self._tool(tc)

    def _tool(self, tc: dict) -> None:
        i = tc.get("index", len(self.tools))
        t = self.tools.setdefault(i, {"type": "function", "function": {"name": "", "arguments": ""}})
        fn = tc.get("function") or {}
        t["function"]["name"] += fn.get("name") or ""
        t["function"]["arguments"] += fn.get("arguments") or ""
        if tc.get("id"):
            t["id"] = tc["id"]
        if tc.get("type"):
            t["type"] = tc["type"]

    def as_chat(self) -> dict:
        msg: dict[str, Any] = {"role": self.role, "content": "".join(self.content)}
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning)
        if self.tools:
            msg["tool_calls"] = [self.tools[i] for i in sorted(self.tools)]
        out = {"finish_reason": self.finish_reason, "index": self.index, "message": msg}
        if self.logprobs is not None:
            out["logprobs"] = {"content": self.logprobs}
        return out

    def as_text(self) -> dict:
        return {"text": "".join(self.content), "index": self.index,
                "logprobs": {"content": self.logprobs} if self.logprobs is not None else None,
                "finish_reason": self.finish_reason}


def events(body: bytes):
    """The JSON of each ``data:`` event of a server-sent event stream (comments and [DONE] skipped)."""
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = b"\n".join(line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:"))
        if data and data != b"[DONE]":
            yield json.loads(data)


def assemble(kind: str, body: bytes) -> tuple[int, dict]:
    """(HTTP status, the answer) from a whole stream; ValueError when it is not one."""
    choices: dict[int, _Choice] = {}
    head: dict[str, Any] = {}
    usage = timings = None
    for ev in events(body):
        if not isinstance(ev, dict):
            raise ValueError("an event that is not a JSON object")
        if "error" in ev:
            err = ev["error"]
            code = err.get("code") if isinstance(err, dict) else None
            return (code if isinstance(code, int) and 400 <= code < 600 else 500), {"error": err}
        for k in ("id", "created", "model", "system_fingerprint"):
            if k in ev:
                head[k] = ev[k]
        usage = ev.get("usage") or usage
        timings = ev.get("timings") or timings
        for ch in ev.get("choices") or ():
            i = ch.get("index", 0) if isinstance(ch, dict) else 0
            if isinstance(ch, dict):
                choices.setdefault(i, _Choice(i)).add(ch)
    if not head:
        raise ValueError("no completion events in the backend's stream")
    ordered = [choices[i] for i in sorted(choices)] or [_Choice(0)]
    out: dict[str, Any] = {
        "choices": [c.as_chat() if kind == "chat" else c.as_text() for c in ordered],
        "created": head.get("created"), "model": head.get("model"),
        "system_fingerprint": head.get("system_fingerprint"), "object": OBJECT[kind]}
    if usage is not None:
        out["usage"] = usage
    out["id"] = head.get("id")
    if timings is not None:
        out["timings"] = timings
    return 200, out
