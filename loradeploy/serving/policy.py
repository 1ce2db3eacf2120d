"""What a served port lets through: a pure ``route(method, raw_target, headers, body, port_info)`` that
answers a request itself (``Reply``) or names what to send the backend (``Forward``).

- **Allow-list.** A port exposes a stated set of routes (``ROUTES``): the OpenAI API our users call,
  llama-server's ``/health`` and ``/metrics``, the tokenizer routes evaluation counts prompts with, and
  loradeploy's own (``routes.py``). Every other path is 404; a known path asked with another method is
  405 with ``Allow``. Adapter listings and scale changes (``/lora-adapters``), ``/v1/responses``,
  ``/completion``, ``/infill``, ``/v1/messages``... are never reachable from a port.
- **Paths decoded as the backend decodes them.** llama-server's cpp-httplib drops a ``#fragment``,
  splits the target at the first ``?`` and percent-decodes the path (``%XX`` of any case, and ``%uXXXX``;
  a ``%`` it cannot decode stays literal). Here the path is decoded the same way, and anything that
  could make the two readings differ is refused with 400: a ``%`` that is not ``%XX`` (``%u`` included),
  a decoded control character or NUL, an encoded ``/`` or ``\\``, invalid UTF-8, a ``#``, a backslash,
  an empty segment (``//``) and a dot segment (``.``, ``..``). The query is only read past: no allowed
  route takes one, so none is forwarded.
- **Bodies checked and re-serialised.** A POST body must be UTF-8 JSON, one object, without NUL (raw or
  escaped), lone surrogates, duplicate keys, non-finite numbers or nesting deeper than ``MAX_DEPTH``, and at most
  ``max_body`` bytes (413). The backend receives ``json.dumps`` of the checked object after the port's
  rules (the system prompt on chat, and in adapter mode the port's ``lora`` selection on every
  generation route, replacing whatever the client sent), never the client's bytes.
- **A client that leaves cancels its request.** llama-server stops generating for a streaming client
  that disconnects, not for a non-streaming one. So on a port whose backend streams the OpenAI way
  (``PortInfo.stream_cancel``), a non-streaming chat or completion is asked of the backend as a stream
  (with usage) and ``Forward.assemble`` names the answer the front door builds from its events
  (``serving.assemble``); closing the backend connection then stops the generation.

Every refusal is JSON in OpenAI's error shape; ``/metrics`` is the front door's own (``Reply.page``)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from .routes import INFO_PATH, PROXY_PATH

MAX_BODY = 8 * 1024 * 1024
MAX_DEPTH = 64

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
MODELS = "/v1/models"
# path -> (method, kind). Kinds: "gen" (a JSON body that generates: system prompt on chat, the port's lora
# selection in adapter mode), "json" (a JSON body that selects nothing: the client's lora is removed),
# "get" (forwarded without a body), "models", "info", "proxy", "metrics" (answered here).
ROUTES: dict[str, tuple[str, str]] = {
    MODELS: ("GET", "models"),
    CHAT: ("POST", "gen"),
    COMPLETIONS: ("POST", "gen"),
    EMBEDDINGS: ("POST", "gen"),
    "/tokenize": ("POST", "json"),               # llama-server's tokenizer (evaluation counts prompts)
    "/extras/tokenize/count": ("POST", "json"),  # llama-cpp-python's
    "/health": ("GET", "get"),
    "/metrics": ("GET", "metrics"),
    INFO_PATH: ("GET", "info"),
    PROXY_PATH: ("GET", "proxy"),
}

# non-streaming requests asked of the backend as streams, and what the front door assembles from them
ASSEMBLED = {CHAT: "chat", COMPLETIONS: "completions"}

_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
_SURROGATE = re.compile("[\ud800-\udfff]")
_TARGET_OK = re.compile(rb"[\x21-\x7e]*")  # what a request target may hold at all: visible ASCII


@dataclass(frozen=True)
class PortInfo:
    """What routing needs to know about one port, as the proxy reads it from its control file."""
    alias: str | None = None
    system_prompt: str = ""
    lora: list | None = None        # adapter mode: the port's selection, forced onto every generation request
    created: int = 0                # /v1/models in adapter mode
    embeddings: bool = False        # does the served model answer /v1/embeddings
    max_body: int = MAX_BODY
    stream_cancel: bool = False     # the backend streams OpenAI-style events: ask it non-streaming requests as streams
    info: dict = field(default_factory=dict)    # /loradeploy/info
    proxy: dict = field(default_factory=dict)   # /loradeploy/proxy


@dataclass(frozen=True)
class Reply:
    """An answer the proxy gives itself."""
    status: int
    obj: Any
    headers: tuple[tuple[str, str], ...] = ()
    page: str | None = None         # a page the front door renders itself instead of ``obj`` ("metrics")


@dataclass(frozen=True)
class Forward:
    """What the backend receives: an allow-listed, normalised path and, for POST, the re-serialised body."""
    method: str
    path: str
    body: bytes | None = None
    assemble: str | None = None     # "chat" | "completions": the client wants one JSON answer built from a stream


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def error(status: int, message: str, code: str | None = None, headers: Iterable[tuple[str, str]] = ()) -> Reply:
    err = {"message": message, "type": "invalid_request_error" if status < 500 else "server_error"}
    if code:
        err["code"] = code
    return Reply(status, {"error": err}, tuple(headers))


# ----------------------------------------------------------------------------- paths

def normalise_path(raw_target: bytes) -> str:
    """The path of an origin-form request target, decoded as cpp-httplib decodes it, or BadRequest
    wherever a decoding could be read two ways. The query is dropped."""
    if not raw_target.startswith(b"/") or not _TARGET_OK.fullmatch(raw_target):
        raise BadRequest("the request target must be a path of visible ASCII characters")
    if b"#" in raw_target:
        raise BadRequest("a request target carries no fragment")
    raw = raw_target.split(b"?", 1)[0]
    if b"\\" in raw:
        raise BadRequest("a backslash in the path")
    if raw.count(b"%") != len(_PCT.findall(raw)):
        raise BadRequest("a '%' in the path that is not %XX")

    def byte(m: re.Match) -> bytes:
        b = int(m.group(1), 16)
        if b < 0x20 or b == 0x7f:
            raise BadRequest("an encoded control character in the path")
        if b in (0x2f, 0x5c):
            raise BadRequest("an encoded '/' or '\\' in the path")
        return bytes([b])

    try:
        path = _PCT.sub(byte, raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the decoded path is not UTF-8") from None
    segments = path.split("/")[1:]
    if any(s == "" for s in segments[:-1]):
        raise BadRequest("an empty segment ('//') in the path")
    if any(s in (".", "..") for s in segments):
        raise BadRequest("a dot segment in the path")
    return path


# ----------------------------------------------------------------------------- bodies

def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise BadRequest(f"duplicate key {k!r} in the JSON body")
        out[k] = v
    return out


def _no_constant(name: str):
    raise BadRequest(f"{name} is not JSON")


def _bad_text(s: str) -> str | None:
    if "\x00" in s:
        return "a NUL character in the JSON body"
    if _SURROGATE.search(s):  # an escaped lone surrogate: Python reads it, llama-server's parser does not
        return "a lone surrogate (\\ud800-\\udfff) in the JSON body"
    return None


def _walk(obj: Any) -> None:
    """Bound the nesting and refuse NUL and lone surrogates in every string and key, without recursion."""
    stack = [(obj, 1)]
    while stack:
        cur, depth = stack.pop()
        if isinstance(cur, (dict, list)):
            if depth > MAX_DEPTH:
                raise BadRequest(f"the JSON body nests deeper than {MAX_DEPTH}")
            items = cur.items() if isinstance(cur, dict) else ((None, v) for v in cur)
            for k, v in items:
                if k is not None and (why := _bad_text(k)):
                    raise BadRequest(why)
                stack.append((v, depth + 1))
        elif isinstance(cur, str) and (why := _bad_text(cur)):
            raise BadRequest(why)


def parse_body(body: bytes, max_body: int = MAX_BODY) -> dict:
    """A request body as one checked JSON object, or BadRequest (413 when it is too large)."""
    if len(body) > max_body:
        raise BadRequest(f"the request body is over {max_body} bytes", 413)
    if b"\x00" in body:
        raise BadRequest("a NUL byte in the request body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest(f"the JSON body nests deeper than {MAX_DEPTH}") from None
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    _walk(data)
    return data


def with_system_prompt(data: dict, prompt: str) -> dict:
    """A chat request without a system (or developer) message gets the configured one; a request's own
    is kept."""
    msgs = data.get("messages")
    if prompt and isinstance(msgs, list) and not any(
            isinstance(m, dict) and m.get("role") in ("system", "developer") for m in msgs):
        return {**data, "messages": [{"role": "system", "content": prompt}, *msgs]}
    return data


# ----------------------------------------------------------------------------- the route

def route(method: str, raw_target: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes,
          port_info: PortInfo) -> Reply | Forward:
    """What to do with one request on a port: answer it here, or forward what the backend may see."""
    try:
        path = normalise_path(raw_target)
    except BadRequest as exc:
        return error(exc.status, str(exc), "bad_path")
    allowed = ROUTES.get(path)
    if allowed is None or path == EMBEDDINGS and not port_info.embeddings:
        return error(404, f"no route {path} on this port", "not_found")
    want, kind = allowed
    if method != want:
        return error(405, f"{path} takes {want}", "method_not_allowed", [("allow", want)])
    if kind == "info":
        return Reply(200, port_info.info)
    if kind == "proxy":
        return Reply(200, port_info.proxy)
    if kind == "metrics":
        return Reply(200, None, page="metrics")
    if kind == "models" and port_info.lora is not None:
        return Reply(200, {"object": "list", "data": [{"id": port_info.alias, "object": "model",
                                                       "owned_by": "loradeploy", "created": port_info.created}]})
    if want == "GET":
        return Forward("GET", path)
    for k, v in headers:
        if k.lower() == b"content-encoding" and v.strip().lower() not in (b"", b"identity"):
            return error(415, "a request body must not be content-encoded", "unsupported_encoding")
    try:
        data = parse_body(body, port_info.max_body)
    except BadRequest as exc:
        return error(exc.status, str(exc), "bad_body")
    data.pop("lora", None)
    if kind == "gen":
        if path == CHAT:
            data = with_system_prompt(data, port_info.system_prompt)
        if port_info.lora is not None:
            data["lora"] = port_info.lora
        if port_info.stream_cancel and path in ASSEMBLED and data.get("stream") is not True:
            data["stream"], data["stream_options"] = True, {"include_usage": True}
            return Forward("POST", path, json.dumps(data).encode(), ASSEMBLED[path])
    return Forward("POST", path, json.dumps(data).encode())
