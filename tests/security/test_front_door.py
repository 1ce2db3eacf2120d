"""Hostile input against the real front door (issue 19): every served port is attacked with raw bytes,
as a client on this machine would, and what comes back is checked.

The deployment (conftest.py): three demo personas in adapter mode on one shared llama-server, a port
each, and one persona merged on its own port; an api key added to the running deployment by a re-run.
Every read has a deadline (rawhttp.exchange), so a case the server does not answer fails as "no answer"
instead of hanging the suite.

What must hold: every malformed or ambiguous request gets an HTTP answer (400/404/405/413/431, JSON in
OpenAI's error shape) and, where its framing is in doubt, the connection closes; no route, encoding or
body trick reaches another persona, the bare base or the shared server's adapter scales; slow clients
are cut off by the head timeout while others are served; a client that leaves stops its generation;
every route needs the key, and no backend answers without its own key."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from loradeploy.demo.samples import render_chatml
from tests.security import rawhttp
from tests.security.conftest import ADAPTERS, KEY, MERGED, PERSONA, PROMPT, TEST_LIMITS, signs
from tests.security.rawhttp import Answer, chat_body, exchange, request

pytestmark = [pytest.mark.timeout(300)]

TARGET = "majora"                                   # the port most cases attack
OTHERS = [m for m in ADAPTERS if m != TARGET]
REFUSED = (400, 404, 405, 413, 415, 431)


def port(d, model: str = TARGET) -> int:
    return d.ports[model]


def text_of(a: Answer) -> str:
    d = a.json()
    ch = d["choices"][0]
    return ch["message"]["content"] if "message" in ch else ch["text"]


def responses(raw: bytes) -> int:
    """How many HTTP responses ``raw`` holds (a smuggled request would add one)."""
    return len(re.findall(rb"(?:^|\r\n)HTTP/1\.[01] \d{3} ", raw))


def not_from_backend(a: Answer) -> bool:
    """The proxy answered itself: llama-server's replies carry ``Server: llama.cpp``."""
    return "llama.cpp" not in (a.header("server") or "")


def assert_refused(a: Answer, statuses=REFUSED, *, close: bool = False, what: str = "") -> None:
    assert a.status is not None, f"{what}: no HTTP answer (dropped or hung): {a!r}"
    assert a.status in statuses, f"{what}: {a!r}"
    assert a.error_json(), f"{what}: the refusal is not a JSON error: {a!r}"
    assert not_from_backend(a), f"{what}: the backend answered: {a!r}"
    if close:
        assert a.closed, f"{what}: the connection stayed open after a request whose framing is in doubt: {a!r}"


def chat(prompt: str = PROMPT, **extra) -> bytes:
    return json.dumps(chat_body(prompt, **extra)).encode()


def post(d, path: str, body: bytes, model: str = TARGET, *, headers=None, timeout: float = 30, **kw) -> Answer:
    return exchange(port(d, model), request("POST", path, body, key=d.key, headers=headers), timeout=timeout, **kw)


def get(d, path: str, model: str = TARGET, *, key: str | None = "default", **kw) -> Answer:
    k = d.key if key == "default" else key
    return exchange(port(d, model), request("GET", path, key=k), timeout=kw.pop("timeout", 15), **kw)


# ============================================================================ smuggling

CHAT_JSON = chat()
SMUGGLED = b"POST /lora-adapters HTTP/1.1\r\nHost: x\r\nContent-Length: 27\r\n\r\n[{\"id\": 1, \"scale\": 1.0}]  "


def _head(lines: list[str], version: str = "HTTP/1.1", target: str = "/v1/chat/completions") -> bytes:
    return (f"POST {target} {version}\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n" + "".join(f"{h}\r\n" for h in lines) + "\r\n").encode()


SMUGGLING = {
    # CL.TE: a front that reads the length and a back that reads chunks see two different requests
    "cl-te": _head(["Content-Length: 6", "Transfer-Encoding: chunked"]) + b"0\r\n\r\n" + SMUGGLED,
    "te-cl": _head(["Transfer-Encoding: chunked", f"Content-Length: {len(CHAT_JSON)}"])
    + f"{len(CHAT_JSON):x}\r\n".encode() + CHAT_JSON + b"\r\n0\r\n\r\n" + SMUGGLED,
    "two-content-lengths": _head([f"Content-Length: {len(CHAT_JSON)}", "Content-Length: 3"]) + CHAT_JSON + SMUGGLED,
    "content-length-list": _head([f"Content-Length: {len(CHAT_JSON)}, 3"]) + CHAT_JSON + SMUGGLED,
    "content-length-plus": _head([f"Content-Length: +{len(CHAT_JSON)}"]) + CHAT_JSON + SMUGGLED,
    "content-length-hex": _head([f"Content-Length: 0x{len(CHAT_JSON):x}"]) + CHAT_JSON + SMUGGLED,
    "te-chunked-identity": _head(["Transfer-Encoding: chunked, identity"]) + b"0\r\n\r\n" + SMUGGLED,
    "te-identity-chunked-cl": _head(["Transfer-Encoding: identity", "Transfer-Encoding: chunked",
                                     "Content-Length: 6"]) + b"0\r\n\r\n" + SMUGGLED,
    "te-xchunked": _head(["Transfer-Encoding: xchunked", "Content-Length: 6"]) + b"0\r\n\r\n" + SMUGGLED,
    "te-space-before-colon": _head(["Transfer-Encoding : chunked", "Content-Length: 6"]) + b"0\r\n\r\n" + SMUGGLED,
    "te-folded-into-chunked": _head(["Content-Length: 6", "Transfer-Encoding:", " chunked"]) + b"0\r\n\r\n" + SMUGGLED,
    "te-on-http-1.0": _head(["Transfer-Encoding: chunked"], "HTTP/1.0")
    + f"{len(CHAT_JSON):x}\r\n".encode() + CHAT_JSON + b"\r\n0\r\n\r\n" + SMUGGLED,
    "te-and-cl-on-http-1.0": _head(["Transfer-Encoding: chunked", "Content-Length: 6"], "HTTP/1.0")
    + b"0\r\n\r\n" + SMUGGLED,
    "bare-lf-header": _head(["Content-Length: 6\nTransfer-Encoding: chunked"]) + b"0\r\n\r\n" + SMUGGLED,
    "space-in-header-name": _head(["Content Length: 6"]) + b"0\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("case", list(SMUGGLING))
def test_ambiguous_framing_is_refused_and_the_connection_closed(deployed, case):
    a = exchange(port(deployed), SMUGGLING[case], timeout=15, wait_close=3)
    assert_refused(a, (400, 501), close=True, what=case)
    assert responses(a.raw) == 1, f"{case}: a second (smuggled) request was answered: {a.raw!r}"


def all_responses(raw: bytes) -> list[tuple[int, bytes]]:
    """Every complete response in ``raw``, in order: (status, body)."""
    out = []
    while raw:
        status, _, body, rest, complete = rawhttp._parse(raw)
        if status is None or not complete:
            break
        out.append((status, body))
        raw = rest
    return out


def test_obs_fold_neither_hides_a_header_nor_smuggles(deployed):
    """RFC 9112 lets a server refuse obs-fold (400) or unfold it into the previous field; either way the
    folded line never becomes a header of its own (here a Content-Length that would swallow the next
    request into the body), and whatever follows the declared body is one more request under the port's
    rules (here refused)."""
    body = CHAT_JSON + SMUGGLED
    a = exchange(port(deployed), _head(["X-Pad: a", f" Content-Length: {len(body)}",
                                        f"Content-Length: {len(CHAT_JSON)}"]) + body, timeout=30, wait_close=3)
    got = all_responses(a.raw)
    assert got, f"no answer: {a!r}"
    first, rest = got[0], got[1:]
    if first[0] == 400:
        assert a.closed and not rest, a
    else:
        assert first[0] == 200 and signs(json.loads(first[1])["choices"][0]["message"]["content"]) == {TARGET}, a
        assert all(st in (400, 404) for st, _ in rest), f"what followed the body was not refused: {a.raw!r}"


def test_a_request_in_a_body_stays_a_body(deployed):
    """A whole request written inside a JSON string, and as a GET's declared body, is never run."""
    a = post(deployed, "/v1/chat/completions", chat(stop=[SMUGGLED.decode()]), wait_close=1)
    assert a.status == 200 and signs(text_of(a)) == {TARGET}, a
    assert responses(a.raw) == 1, a.raw
    # a GET with a body: the body is read (or refused), never parsed as the next request
    g = exchange(port(deployed), request("GET", "/health", SMUGGLED, key=KEY, json_type=False), timeout=15,
                 wait_close=2)
    assert g.status is not None and g.status in (200, 400, 413), g
    assert responses(g.raw) == 1, f"the body of a GET was run as a request: {g.raw!r}"


def test_pipelined_requests_each_get_the_port_rules(deployed):
    """Two requests back to back on one connection: both answered in order, each as the port's persona
    (the second asks for another persona's adapter)."""
    second = chat(lora=[{"id": 1, "scale": 1.0}, {"id": 2, "scale": 1.0}])
    data = request("POST", "/v1/chat/completions", CHAT_JSON, key=KEY) + \
        request("POST", "/v1/chat/completions", second, key=KEY, headers={"Connection": "close"})
    a = exchange(port(deployed), data, timeout=30, wait_close=15)
    assert a.status == 200 and signs(text_of(a)) == {TARGET}, a
    b = rawhttp._parse(a.rest)
    assert b[0] == 200 and b[4], a.rest
    assert signs(json.loads(b[2])["choices"][0]["message"]["content"]) == {TARGET}, b[2]


# ============================================================================ heads, bodies, chunks

def test_oversized_head_is_431(deployed):
    a = exchange(port(deployed), request("GET", "/v1/models", key=KEY, headers={"X-Big": "a" * 70_000}),
                 timeout=15, wait_close=2)
    assert_refused(a, (431,), close=True, what="70 KB header")


def test_oversized_request_line_is_refused(deployed):
    a = exchange(port(deployed), request("GET", "/v1/models?" + "a" * 70_000, key=KEY), timeout=15, wait_close=2)
    assert_refused(a, (414, 431, 400), close=True, what="70 KB request line")


@pytest.mark.parametrize("n", [1_000, 10_000])
def test_too_many_headers_is_431(deployed, n):
    hs = [(f"x{i}", "1") for i in range(n)]
    a = exchange(port(deployed), request("GET", "/v1/models", key=KEY, headers=hs), timeout=15, wait_close=2)
    assert_refused(a, (431,), close=True, what=f"{n} headers")


def _cap(d) -> int:
    return int(d.limits(TARGET)["max_body"])


def test_the_configured_body_cap_reached_the_port(deployed):
    if "max_body_mb" not in rawhttp_limit_keys():
        pytest.fail("deployment.llamacpp.max_body_mb is not a config key: the body cap cannot be configured")
    assert _cap(deployed) == int(TEST_LIMITS["max_body_mb"] * 1024 * 1024), deployed.proxy_conf(TARGET)


def rawhttp_limit_keys() -> dict:
    from tests.security.conftest import limit_keys
    return limit_keys()


def test_body_over_the_cap_is_413(deployed):
    cap = _cap(deployed)
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * cap + b'"}]}'
    a = post(deployed, "/v1/chat/completions", body, timeout=20, wait_close=2)
    assert_refused(a, (413,), close=True, what="body over the cap")


def test_chunked_body_over_the_cap_is_413(deployed):
    cap = _cap(deployed)
    piece = b"a" * 65536
    chunks = b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for _ in range(cap // len(piece) + 2))
    data = request("POST", "/v1/chat/completions", None, key=KEY,
                   headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"}) + chunks + b"0\r\n\r\n"
    a = exchange(port(deployed), data, timeout=20, wait_close=2)
    assert_refused(a, (413,), close=True, what="chunked body over the cap")


def test_ten_gigabyte_content_length_with_a_tiny_body_is_413_at_once(deployed):
    data = request("POST", "/v1/chat/completions", None, key=KEY, headers={"Content-Length": "10000000000"}) + b"{}"
    a = exchange(port(deployed), data, timeout=10, wait_close=2)
    assert_refused(a, (413,), close=True, what="Content-Length 10 GB")
    assert a.elapsed < 4, f"413 took {a.elapsed:.1f}s (it must not wait for the body)"


def test_expect_100_continue_over_the_cap_is_413_without_continue(deployed):
    data = request("POST", "/v1/chat/completions", None, key=KEY,
                   headers={"Content-Length": str(_cap(deployed) + 1), "Expect": "100-continue"})
    a = exchange(port(deployed), data, timeout=10, wait_close=2)
    assert a.status == 413, a
    assert b"100 Continue" not in a.raw, a.raw


BAD_BODIES = {
    "chunk-size-zz": ("chunked", b"zz\r\n" + CHAT_JSON + b"\r\n0\r\n\r\n"),
    "chunk-size-minus-5": ("chunked", b"-5\r\n" + CHAT_JSON + b"\r\n0\r\n\r\n"),
    "chunk-size-overflow": ("chunked", b"fffffffffffffffffffffff\r\n" + CHAT_JSON + b"\r\n0\r\n\r\n"),
    "chunk-size-0x": ("chunked", b"0x10\r\n" + CHAT_JSON[:16] + b"\r\n0\r\n\r\n"),
    "chunk-without-crlf": ("chunked", f"{len(CHAT_JSON):x}\r\n".encode() + CHAT_JSON + b"XX0\r\n\r\n"),
    "nul-in-a-string": ("length", b'{"messages": [{"role": "user", "content": "apple\x00river"}], "max_tokens": 4}'),
    "escaped-nul": ("length", b'{"messages": [{"role": "user", "content": "apple\\u0000river"}], "max_tokens": 4}'),
    "nul-after-json": ("length", CHAT_JSON + b"\x00" + json.dumps({"lora": [{"id": 1, "scale": 1.0}]}).encode()),
    "nul-before-json": ("length", b"\x00" + CHAT_JSON),
    "non-utf8": ("length", b'{"messages": [{"role": "user", "content": "\xff\xfe apple"}], "max_tokens": 4}'),
    "utf16-with-bom": ("length", CHAT_JSON.decode().encode("utf-16")),
    "lone-surrogate-escape": ("length", b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 4}'),
    "nested-100000-deep": ("length", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "nested-objects-100000-deep": ("length", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
    "duplicate-keys": ("length", b'{"messages": [{"role": "user", "content": "a"}], '
                                 b'"messages": [{"role": "user", "content": "b"}]}'),
    "duplicate-lora": ("length", CHAT_JSON[:-1] + b', "lora": [], "lora": [{"id": 1, "scale": 1.0}]}'),
    "not-an-object": ("length", json.dumps([chat_body(PROMPT)]).encode()),
    "nan": ("length", CHAT_JSON[:-1] + b', "temperature": NaN}'),
    "trailing-garbage": ("length", CHAT_JSON + b"}"),
    "two-objects": ("length", CHAT_JSON + json.dumps({"lora": [{"id": 1, "scale": 1.0}]}).encode()),
    "truncated": ("length", CHAT_JSON[:-5]),
    "empty": ("length", b""),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_bodies_get_a_json_400(deployed, case):
    kind, body = BAD_BODIES[case]
    if kind == "chunked":
        data = request("POST", "/v1/chat/completions", None, key=KEY,
                       headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"}) + body
    else:
        data = request("POST", "/v1/chat/completions", body, key=KEY)
    a = exchange(port(deployed), data, timeout=20)
    assert_refused(a, (400,), what=case)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_content_encoded_bodies_are_refused(deployed, encoding):
    import gzip
    a = post(deployed, "/v1/chat/completions", gzip.compress(CHAT_JSON), headers={"Content-Encoding": encoding})
    assert_refused(a, (400, 415), what=encoding)


# ============================================================================ paths

# (method, target, body): each either refused by the proxy, or (an allowed route after decoding) answered
# under the port's own rules
PATHS = [
    ("POST", "/v1/chat/%63ompletions", "chat"),
    ("POST", "/v1/chat/completion%73", "chat"),
    ("POST", "/v1/chat/%63%6F%6D%70%6c%65%74%69%6f%6e%73", "chat"),
    ("POST", "/%63ompletion", "completion"),
    ("POST", "/%63ompletions", "completion"),
    ("POST", "/%6cora-adapters", "scales"),
    ("POST", "/%6Cora-adapters", "scales"),
    ("GET", "/%6cora-adapters", None),
    ("POST", "/%256cora-adapters", "scales"),
    ("POST", "/%u006cora-adapters", "scales"),
    ("POST", "/lora%2dadapters", "scales"),
    ("POST", "/v1/%72esponses", "chat"),
    ("POST", "/v1/chat/../../lora-adapters", "scales"),
    ("POST", "/v1/chat/./completions", "chat"),
    ("POST", "/v1/chat/completions/..", "chat"),
    ("POST", "/v1/chat/%2e%2e/%2e%2e/lora-adapters", "scales"),
    ("POST", "/v1/chat/%2E/completions", "chat"),
    ("POST", "/x/..%2flora-adapters", "scales"),
    ("POST", "//lora-adapters", "scales"),
    ("POST", "//v1/chat/completions", "chat"),
    ("POST", "/v1//chat/completions", "chat"),
    ("POST", "/v1/chat/completions/", "chat"),
    ("POST", "/v1\\chat\\completions", "chat"),
    ("POST", "/lora-adapters\\", "scales"),
    ("POST", "/v1/chat%5ccompletions", "chat"),
    ("POST", "/v1%2fchat%2fcompletions", "chat"),
    ("POST", "/v1/chat%2Fcompletions", "chat"),
    ("POST", "/lora-adapters%00", "scales"),
    ("POST", "/v1/chat/completions%00", "chat"),
    ("POST", "/v1/chat/completions%0d%0a", "chat"),
    ("POST", "/v1/chat/completions#/lora-adapters", "chat"),
    ("POST", "/lora-adapters#/v1/chat/completions", "scales"),
    ("POST", "/lora-adapters?/v1/chat/completions", "scales"),
    ("POST", "/v1/chat/completions;/lora-adapters", "chat"),
    ("POST", "http://127.0.0.1/lora-adapters", "scales"),
    ("POST", "*", "scales"),
    ("POST", "lora-adapters", "scales"),
    ("POST", "/V1/CHAT/COMPLETIONS", "chat"),
    ("POST", "/v1/chat/completions\t", "chat"),
    ("POST", "/%ef%bc%8flora-adapters", "scales"),   # a fullwidth solidus
    ("POST", "/v1/chat/completions%", "chat"),
    ("POST", "/v1/chat/completions%zz", "chat"),
]


def _body(kind: str | None) -> bytes | None:
    other = [{"id": i, "scale": 1.0} for i in (1, 2)]
    return {None: None, "chat": chat(lora=other), "completion": json.dumps(
        {"prompt": PROMPT, "n_predict": 8, "lora": other}).encode(), "scales": json.dumps(other).encode()}[kind]


@pytest.mark.parametrize("method,target,kind", PATHS, ids=[t for _, t, _ in PATHS])
def test_encoded_and_odd_paths_are_refused_or_keep_the_port_rules(deployed, method, target, kind):
    a = exchange(port(deployed), request(method, target, _body(kind), key=KEY), timeout=30)
    assert a.status is not None, f"{target}: no answer: {a!r}"
    if a.status == 200:
        assert kind == "chat", f"{target} reached a route the port does not serve: {a!r}"
        assert signs(text_of(a)) == {TARGET}, f"{target} answered as another persona: {a!r}"
    else:
        assert_refused(a, (400, 404, 405, 414), what=target)


# ============================================================================ llama-server's own routes

BACKEND_ROUTES = [
    ("POST", "/v1/responses", "chat"), ("POST", "/responses", "chat"),
    ("POST", "/v1/messages", "chat"), ("POST", "/v1/messages/count_tokens", "chat"),
    ("POST", "/completion", "completion"), ("POST", "/completions", "completion"),
    ("POST", "/chat/completions", "chat"), ("POST", "/infill", "completion"),
    ("GET", "/lora-adapters", None), ("POST", "/lora-adapters", "scales"),
    ("GET", "/slots", None), ("POST", "/slots/0?action=erase", "chat"), ("POST", "/slots/0?action=save", "chat"),
    ("GET", "/props", None), ("POST", "/props", "chat"),
    ("POST", "/apply-template", "chat"), ("POST", "/detokenize", "scales"),
    ("POST", "/embedding", "chat"), ("POST", "/embeddings", "chat"), ("POST", "/v1/embeddings", "chat"),
    ("POST", "/rerank", "chat"), ("POST", "/reranking", "chat"), ("POST", "/v1/rerank", "chat"),
    ("POST", "/v1/reranking", "chat"),
    ("POST", "/v1/audio/transcriptions", "chat"), ("POST", "/v1/audio/speech", "chat"),
    ("GET", "/models", None), ("GET", "/api/tags", None), ("POST", "/api/show", "chat"),
    ("POST", "/api/chat", "chat"), ("POST", "/api/generate", "completion"),
    ("GET", "/v1/health", None), ("GET", "/", None), ("GET", "/index.html", None),
    ("POST", "/v1/models", "chat"), ("GET", "/v1/chat/completions", None), ("DELETE", "/v1/models", None),
    ("PUT", "/lora-adapters", "scales"), ("OPTIONS", "/lora-adapters", None), ("TRACE", "/", None),
    ("CONNECT", "127.0.0.1:80", None),
]


@pytest.mark.parametrize("model", [TARGET, MERGED])
def test_no_llama_server_route_is_reachable_from_a_port(deployed, model):
    bad = []
    for method, target, kind in BACKEND_ROUTES:
        a = exchange(port(deployed, model), request(method, target, _body(kind), key=KEY), timeout=20)
        if a.status not in (400, 404, 405) or not a.error_json() or not not_from_backend(a):
            bad.append(f"{method} {target}: {a!r}")
    if bad:
        pytest.fail(f"{len(bad)} routes answered:\n" + "\n".join(bad[:30]))


def test_head_on_a_post_route_gets_no_generation(deployed):
    a = exchange(port(deployed), request("HEAD", "/v1/chat/completions", key=KEY), timeout=10, head_request=True)
    assert a.status in (404, 405), a


# ============================================================================ one persona per port

def _other_ids() -> list:
    return [[{"id": i, "scale": 1.0}] for i in range(3)] + [
        [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 1.0}, {"id": 2, "scale": 1.0}],
        [{"id": 1, "scale": 5.0}], [{"id": 2, "scale": -1.0}], [{"id": 99, "scale": 1.0}], [],
        [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}, {"id": 2, "scale": 0.0}],
        {"id": 1, "scale": 1.0}, "nayru", None, [{"id": "1", "scale": "1"}], [[1, 1.0]]]


def isolation_attacks(model: str):
    """(name, path, body bytes, headers): requests that generate, each trying to reach another adapter or
    the bare base."""
    pers = [m for m in ADAPTERS if m != model]
    out = [("plain", "/v1/chat/completions", chat(), None)]
    for i, lora in enumerate(_other_ids()):
        out.append((f"lora-{i}", "/v1/chat/completions", chat(lora=lora), None))
    for other in pers:
        out.append((f"model-{other}", "/v1/chat/completions", chat(model=other), None))
        out.append((f"model-{other}-lora", "/v1/chat/completions",
                    chat(model=other, lora=[{"id": ADAPTERS.index(other), "scale": 1.0}]), None))
    out += [
        ("model-base", "/v1/chat/completions", chat(model="base"), None),
        ("escaped-lora-key", "/v1/chat/completions",
         CHAT_JSON[:-1] + b', "\\u006cora": [{"id": 1, "scale": 1.0}]}', None),
        ("LORA-key", "/v1/chat/completions", chat(LORA=[{"id": 1, "scale": 1.0}]), None),
        ("lora-in-message", "/v1/chat/completions", json.dumps({
            "messages": [{"role": "user", "content": PROMPT, "lora": [{"id": 1, "scale": 1.0}]}],
            "max_tokens": 16, "temperature": 0}).encode(), None),
        ("encoded-path", "/v1/chat/%63ompletions", chat(lora=[{"id": 2, "scale": 1.0}]), None),
        ("nul-after-json", "/v1/chat/completions",
         CHAT_JSON + b"\x00" + json.dumps({"lora": [{"id": 1, "scale": 1.0}]}).encode(), None),
        ("escaped-nul-then-lora", "/v1/chat/completions",
         CHAT_JSON[:-1] + b', "x": "\\u0000", "lora": [{"id": 1, "scale": 1.0}]}', None),
        ("duplicate-lora", "/v1/chat/completions",
         CHAT_JSON[:-1] + b', "lora": [], "lora": [{"id": 1, "scale": 1.0}]}', None),
        ("charset-utf16", "/v1/chat/completions", chat(lora=[{"id": 1, "scale": 1.0}]).decode().encode("utf-16-le"),
         {"Content-Type": "application/json; charset=utf-16"}),
        ("text-plain", "/v1/chat/completions", chat(lora=[{"id": 1, "scale": 1.0}]), {"Content-Type": "text/plain"}),
        ("form", "/v1/chat/completions", b"lora=1&prompt=x", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("id-slot-0", "/v1/chat/completions", chat(id_slot=0, cache_prompt=True), None),
        ("id-slot-1", "/v1/chat/completions", chat(id_slot=1, cache_prompt=True), None),
        ("completions-lora", "/v1/completions", json.dumps({
            "prompt": render_chatml([{"role": "user", "content": PROMPT}]), "max_tokens": 16, "temperature": 0,
            "lora": [{"id": (ADAPTERS.index(model) + 1) % 3, "scale": 1.0}]}).encode(), None),
        ("completions-n-predict", "/v1/completions", json.dumps({
            "prompt": render_chatml([{"role": "user", "content": PROMPT}]), "n_predict": 16, "temperature": 0,
            "lora": [{"id": (ADAPTERS.index(model) + 2) % 3, "scale": 1.0}]}).encode(), None),
        ("chunked-body", "/v1/chat/completions", chat(lora=[{"id": 1, "scale": 1.0}]), {"Transfer-Encoding": "chunked"}),
    ]
    return out


def _send(p: int, path: str, body: bytes, headers) -> Answer:
    hs = dict(headers or {})
    if hs.get("Transfer-Encoding") == "chunked":
        data = request("POST", path, None, key=KEY, headers={**hs, "Content-Type": "application/json"}) + \
            f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    else:
        data = request("POST", path, body, key=KEY, headers=hs)
    return exchange(p, data, timeout=60)


@pytest.mark.parametrize("model", ADAPTERS)
def test_every_generation_answers_as_the_port_persona(deployed, model):
    """0 ways to another persona or the bare base: whatever a request carries, an adapter port's answer is
    signed by its own persona, or the request is refused."""
    wrong, answered = [], 0
    for name, path, body, headers in isolation_attacks(model):
        a = _send(port(deployed, model), path, body, headers)
        if a.status == 200:
            answered += 1
            got = signs(text_of(a))
            if got != {model}:
                wrong.append(f"{name}: signed {sorted(got) or 'by no persona (the bare base)'}: {text_of(a)!r}")
        elif a.status not in (400, 413, 415, 422) or not a.error_json():
            wrong.append(f"{name}: {a!r}")
    if wrong:
        pytest.fail(f"port of {model}:\n" + "\n".join(wrong))
    assert answered >= 20, answered


@pytest.mark.parametrize("model", ADAPTERS)
def test_streamed_generation_answers_as_the_port_persona(deployed, model):
    body = chat(stream=True, lora=[{"id": (ADAPTERS.index(model) + 1) % 3, "scale": 1.0}])
    a = exchange(port(deployed, model), request("POST", "/v1/chat/completions", body, key=KEY), timeout=60)
    assert a.status == 200, a
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in a.body.decode().splitlines() if line.startswith("data: {"))
    assert signs(text) == {model}, text


def test_the_merged_port_answers_as_its_persona(deployed):
    a = post(deployed, "/v1/chat/completions", chat(lora=[{"id": 0, "scale": 1.0}]), MERGED)
    assert a.status == 200 and signs(text_of(a)) == {PERSONA[MERGED]}, a


@pytest.mark.parametrize("model", ADAPTERS)
def test_v1_models_names_only_the_port_model(deployed, model):
    a = get(deployed, "/v1/models", model)
    assert a.status == 200, a
    assert [m["id"] for m in a.json()["data"]] == [model], a.body
    assert b".gguf" not in a.body and b"/" not in a.body.replace(b"\\/", b""), a.body


# ============================================================================ slow clients

def _wait_closed(socks: list[socket.socket], deadline: float) -> list[socket.socket]:
    """Read every socket until EOF or reset (discarding a 408 or other answer); the ones still open at
    ``deadline``."""
    open_ = list(socks)
    while open_ and time.monotonic() < deadline:
        r, _, _ = select.select(open_, [], [], max(0.0, min(0.2, deadline - time.monotonic())))
        for s in r:
            try:
                if not s.recv(65536):
                    open_.remove(s)
            except OSError:
                open_.remove(s)
    return open_


def test_slowloris_200_connections_are_cut_off_while_others_are_served(deployed):
    head_timeout = short_limit(deployed, "head_timeout_s")
    slow: list[socket.socket] = []
    stop = threading.Event()
    try:
        for _ in range(200):
            s = rawhttp.connect(port(deployed), timeout=5)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        t0 = time.monotonic()

        def trickle():
            i = 0
            while not stop.is_set():
                for s in slow:
                    try:
                        s.sendall(f"X-{i}: a\r\n".encode())
                    except OSError:
                        pass
                i += 1
                stop.wait(0.3)

        th = threading.Thread(target=trickle, daemon=True)
        th.start()
        served = []
        for _ in range(4):  # normal clients on the same port while the 200 are held
            a = post(deployed, "/v1/chat/completions", CHAT_JSON, timeout=20)
            served.append(a.status == 200 and signs(text_of(a)) == {TARGET})
            assert a.elapsed < 10, a
        assert all(served), served
        left = _wait_closed(slow, t0 + head_timeout + 5)
        stop.set()
        assert not left, (f"{len(left)} of 200 slow connections still open {time.monotonic() - t0:.1f}s after "
                          f"their head began (head timeout {head_timeout}s)")
        a = post(deployed, "/v1/chat/completions", CHAT_JSON, timeout=20)
        assert a.status == 200, a
    finally:
        stop.set()
        for s in slow:
            s.close()


def short_limit(d, name: str, model: str = TARGET) -> float:
    """A port's timeout as its proxy runs it, which the suite set short (conftest.TEST_LIMITS)."""
    v = float(d.limits(model)[name])
    assert v <= 15, f"{name} is {v}s on port {model}: the suite's short setting did not reach the port"
    return v


def closed_within(s: socket.socket, seconds: float, what: str) -> float:
    """Seconds until the server closed ``s``; fails when it is still open ``seconds`` + 5 s later."""
    t0 = time.monotonic()
    left = _wait_closed([s], t0 + seconds + 5)
    assert not left, f"{what}: still open after {time.monotonic() - t0:.1f}s (timeout {seconds}s)"
    return time.monotonic() - t0


def test_a_stalled_body_is_cut_off(deployed):
    body_timeout = short_limit(deployed, "body_timeout_s")
    with rawhttp.connect(port(deployed)) as s:
        s.sendall(request("POST", "/v1/chat/completions", None, key=KEY, headers={"Content-Length": "100"}) + b'{"m')
        closed_within(s, body_timeout, "a body stalled at 3 of 100 bytes")


def test_an_idle_keep_alive_connection_is_closed(deployed):
    idle = short_limit(deployed, "idle_timeout_s")
    with rawhttp.connect(port(deployed)) as s:
        a = exchange(port(deployed), request("GET", "/health", key=KEY), sock=s, timeout=10)
        assert a.status == 200 and not a.closed, a
        assert closed_within(s, idle, "an idle keep-alive connection") >= idle * 0.5, "closed before the idle timeout"


def test_connections_over_the_limit_get_503(deployed):
    lim = deployed.limits(MERGED)
    n = int(lim["max_connections"])
    assert n <= 1024, n
    held = []
    try:
        for _ in range(n):
            s = rawhttp.connect(port(deployed, MERGED), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a head begun, never finished
            held.append(s)
        time.sleep(0.3)
        a = exchange(port(deployed, MERGED), request("GET", "/health", key=KEY), timeout=10, wait_close=2)
        assert a.status == 503 and a.closed, a
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    a = get(deployed, "/health", MERGED)
    assert a.status == 200, a


# ============================================================================ clients that leave

def _metric(d, model: str, name: str) -> float | None:
    a = d.backend_get(model, "/metrics")
    if a.status != 200:
        return None
    m = re.search(rb"^" + re.escape(name.encode()) + rb"\s+([0-9.e+-]+)", a.body, re.M)
    return float(m.group(1)) if m else None


def _busy(d, model: str) -> bool | None:
    a = d.backend_get(model, "/slots")
    if a.status != 200:
        return None
    return any(s.get("is_processing") for s in a.json())


def _wait_busy(d, model: str, want: bool, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() < t0 + timeout:
        if _busy(d, model) is want:
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("model", [TARGET, MERGED])
def test_a_client_that_leaves_stops_its_generation(deployed, model, stream):
    assert _busy(deployed, model) is not None, "cannot read the backend's /slots with its key"
    assert _wait_busy(deployed, model, False, 30) is not None, "the backend is busy before the case"
    # how fast the backend generates here, to know how long a full answer would run
    short = post(deployed, "/v1/chat/completions", chat(max_tokens=256, ignore_eos=True), model, timeout=60)
    assert short.status == 200, short
    rate = short.json()["timings"]["predicted_per_second"]
    n = 7000
    full_s = n / rate
    assert full_s >= 1.5, f"{n} tokens take {full_s:.2f}s here: too short to tell a cancelled answer from a whole one"
    before = _metric(deployed, model, "llamacpp:tokens_predicted_total")
    s = rawhttp.connect(port(deployed, model))
    try:
        s.sendall(request("POST", "/v1/chat/completions", chat(max_tokens=n, ignore_eos=True, stream=stream),
                          key=KEY))
        assert _wait_busy(deployed, model, True, 10) is not None, "the generation never started"
        time.sleep(0.2)
    finally:
        s.close()
    t0 = time.monotonic()
    idle = _wait_busy(deployed, model, False, max(30.0, full_s * 3))
    assert idle is not None, "the backend is still generating"
    assert idle < max(1.5, full_s * 0.4), (f"the backend went on for {idle:.2f}s after the client left "
                                          f"(a full answer runs ~{full_s:.1f}s)")
    after = _metric(deployed, model, "llamacpp:tokens_predicted_total")
    if before is not None and after is not None:
        assert after - before < n * 0.5, (before, after)
    assert time.monotonic() - t0 < 60


def test_a_silent_backend_gets_504_and_the_port_recovers(deployed):
    import psutil

    wait = short_limit(deployed, "backend_timeout_s", MERGED)
    bport, _ = deployed.backend(MERGED)
    servers = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == bport
               and c.status == psutil.CONN_LISTEN and c.pid]
    assert servers, f"no process listens on backend port {bport}"
    pid = servers[0].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        a = post(deployed, "/v1/chat/completions", CHAT_JSON, MERGED, timeout=wait + 15)
        assert a.status == 504 and a.error_json(), a
        assert a.elapsed < wait + 5, a
    finally:
        os.kill(pid, signal.SIGCONT)
    a = post(deployed, "/v1/chat/completions", CHAT_JSON, MERGED, timeout=60)
    assert a.status == 200 and signs(text_of(a)) == {PERSONA[MERGED]}, a


# ============================================================================ auth

def test_adding_an_api_key_to_a_running_deployment_closes_every_port(deployed):
    assert deployed.open_before_key == {m: 200 for m in deployed.ports}, deployed.open_before_key
    assert deployed.rerun_ok, deployed.rerun_detail
    left_open = {m: a for m in deployed.ports if (a := get(deployed, "/v1/models", m, key=None)).status != 401}
    assert not left_open, f"ports still open without the key after the re-run: {left_open}"


AUTH_ROUTES = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", "chat"),
               ("POST", "/v1/completions", "completion"), ("POST", "/v1/embeddings", "chat"),
               ("POST", "/tokenize", "chat"), ("GET", "/health", None), ("GET", "/metrics", None),
               ("GET", "/loradeploy/info", None), ("GET", "/loradeploy/proxy", None),
               ("GET", "/lora-adapters", None), ("POST", "/lora-adapters", "scales"), ("GET", "/slots", None),
               ("POST", "/v1/responses", "chat"), ("GET", "/nothing-here", None), ("HEAD", "/loradeploy/info", None)]
WRONG = {"none": None, "wrong": "Bearer not-the-key", "empty-bearer": "Bearer ", "basic": f"Basic {KEY}",
         "key-only": KEY, "prefix": f"Bearer {KEY[:-1]}", "suffix": f"Bearer {KEY}x", "upper": f"Bearer {KEY.upper()}",
         "two-headers": None}


@pytest.mark.parametrize("model", [*ADAPTERS, MERGED])
def test_every_route_on_every_port_needs_the_key(deployed, model):
    bad = []
    for method, target, kind in AUTH_ROUTES:
        for name, value in WRONG.items():
            hs = [("Authorization", value)] if value else []
            if name == "two-headers":
                hs = [("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {KEY}")]
            a = exchange(port(deployed, model), request(method, target, _body(kind), headers=hs), timeout=15,
                         head_request=method == "HEAD")
            want = (400, 401) if name == "two-headers" else (401,)
            if a.status not in want or (method != "HEAD" and not a.error_json()):
                bad.append(f"{method} {target} [{name}]: {a!r}")
    if bad:
        pytest.fail(f"{len(bad)} unauthenticated answers:\n" + "\n".join(bad[:30]))


@pytest.mark.parametrize("model", [TARGET, MERGED])
def test_the_key_opens_the_served_routes(deployed, model):
    for path in ("/v1/models", "/health", "/loradeploy/info", "/metrics"):
        a = get(deployed, path, model)
        assert a.status == 200, (path, a)


def test_a_large_body_without_the_key_is_not_read(deployed):
    data = request("POST", "/v1/chat/completions", None, headers={"Content-Length": "10000000000"}) + b"{}"
    a = exchange(port(deployed), data, timeout=10, wait_close=2)
    assert a.status in (401, 413) and a.closed, a
    assert a.elapsed < 4, a


def test_our_metrics_are_prometheus_text(deployed):
    a = get(deployed, "/metrics")
    assert a.status == 200, a
    text = a.body.decode()
    for name in ("loradeploy_requests_total", "loradeploy_requests_in_flight", "loradeploy_request_seconds_bucket",
                 "loradeploy_generated_tokens_total", "loradeploy_served_info"):
        assert f"\n{name}" in "\n" + text, f"{name} missing from the port's /metrics: {text[:800]}"
    # the port's own series, and at most the backend's llamacpp:* series relayed: nothing else of the backend's
    foreign = [ln for ln in text.splitlines() if ln and not ln.startswith("#")
               and not ln.startswith(("loradeploy_", "llamacpp:"))]
    assert not foreign, foreign[:10]
    assert KEY not in text and (deployed.backend(TARGET)[1] or "\x00") not in text


BACKEND_LOCKED = [("POST", "/v1/chat/completions", "chat"), ("POST", "/completion", "completion"),
                  ("POST", "/v1/completions", "completion"), ("POST", "/infill", "completion"),
                  ("POST", "/v1/responses", "chat"), ("POST", "/v1/messages", "chat"),
                  ("GET", "/slots", None), ("GET", "/metrics", None), ("GET", "/lora-adapters", None),
                  ("POST", "/lora-adapters", "scales"), ("GET", "/props", None), ("POST", "/props", "chat"),
                  ("POST", "/tokenize", "chat"), ("POST", "/detokenize", "scales"), ("POST", "/apply-template", "chat")]


@pytest.mark.parametrize("model", [TARGET, MERGED])
def test_backend_ports_refuse_loopback_clients_without_their_key(deployed, model):
    bport, bkey = deployed.backend(model)
    assert bkey, f"the backend of {model} (port {bport}) has no key of its own: control.json {deployed.control(model)}"
    assert bkey != KEY, "the backend's key is the clients' key"
    bad = []
    for method, target, kind in BACKEND_LOCKED:
        for value in (None, f"Bearer {KEY}", "Bearer wrong"):
            a = exchange(bport, request(method, target, _body(kind), headers=[("Authorization", value)] if value
                                        else []), timeout=15)
            if a.status != 401:
                bad.append(f"{method} {target} [{value}]: {a!r}")
    if bad:
        pytest.fail(f"{len(bad)} routes answered:\n" + "\n".join(bad[:30]))


@pytest.mark.parametrize("model", [TARGET, MERGED])
def test_the_backend_key_is_on_disk_only_for_the_owner(deployed, model):
    from loradeploy.paths import servers_dir
    for f in Path(servers_dir(deployed.cfg, model)).glob("*.json"):
        if "key" in f.read_text():
            assert f.stat().st_mode & 0o077 == 0, f"{f} holds a key and is readable by others"
    assert KEY not in json.dumps(deployed.proxy_conf(model)), "the clients' key itself is on disk"


# ============================================================================ protocol

def test_http_1_0_gets_no_chunked_reply(deployed):
    a = exchange(port(deployed), request("POST", "/v1/chat/completions", chat(stream=True), key=KEY,
                                         version="HTTP/1.0"), timeout=30, wait_close=10)
    assert a.status == 200, a
    assert "chunked" not in (a.header("transfer-encoding") or "").lower(), a
    assert a.raw.startswith(b"HTTP/1."), a
    assert a.closed and b"[DONE]" in a.raw, a
    g = exchange(port(deployed), request("GET", "/v1/models", key=KEY, version="HTTP/1.0"), timeout=10, wait_close=3)
    assert g.status == 200 and "chunked" not in (g.header("transfer-encoding") or "").lower(), g


def test_head_gets_no_body(deployed):
    """HEAD then GET on one connection: the bytes after HEAD's head must be the GET's response."""
    data = request("HEAD", "/loradeploy/info", key=KEY) + request("GET", "/health", key=KEY,
                                                                  headers={"Connection": "close"})
    a = exchange(port(deployed), data, timeout=10, head_request=True, wait_close=3)
    assert a.status in (200, 405), a
    assert a.rest == b"" and a.closed or a.rest.startswith(b"HTTP/1.1 "), f"HEAD sent a body: {a.raw!r}"


GARBAGE = {
    "junk": b"GARBAGE\r\n\r\n",
    "no-version": b"GET /health\r\n\r\n",
    "http-2": b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n",
    "http-9": b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
    "two-spaces": b"GET  /health HTTP/1.1\r\nHost: x\r\n\r\n",
    "nul-in-line": b"GET /hea\x00lth HTTP/1.1\r\nHost: x\r\n\r\n",
    "utf8-in-target": "GET /héalth HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "tls-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
    "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "header-without-colon": b"GET /health HTTP/1.1\r\nHost: x\r\nBroken\r\n\r\n",
    "nul-in-header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "no-host-1.1": b"GET /health HTTP/1.1\r\n\r\n",
    "long-method": b"A" * 5000 + b" /health HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_gets_an_answer_and_a_close(deployed, case):
    a = exchange(port(deployed), GARBAGE[case], timeout=10, wait_close=3)
    assert a.status is not None and 400 <= a.status < 600 and a.status not in (500, 502), \
        f"{case}: no HTTP error answer: {a!r}"
    assert a.closed, f"{case}: {a!r}"


def test_a_key_in_chunked_trailers_does_not_authenticate(deployed):
    data = request("POST", "/v1/chat/completions", None, headers={"Transfer-Encoding": "chunked",
                                                                   "Content-Type": "application/json"}) + \
        f"{len(CHAT_JSON):x}\r\n".encode() + CHAT_JSON + f"\r\n0\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    a = exchange(port(deployed), data, timeout=15)
    assert a.status in (400, 401), a


def test_upgrade_is_never_switched_to(deployed):
    for up in ("websocket", "h2c"):
        a = exchange(port(deployed), request("GET", "/health", key=KEY, headers={
            "Connection": "Upgrade, HTTP2-Settings", "Upgrade": up, "HTTP2-Settings": "AAMAAABkAAQAAP__",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}), timeout=10)
        assert a.status is not None and a.status != 101, (up, a)


def test_a_huge_chunk_extension_is_refused(deployed):
    data = request("POST", "/v1/chat/completions", None, key=KEY, headers={"Transfer-Encoding": "chunked"}) + \
        f"{len(CHAT_JSON):x};".encode() + b"e" * 200_000 + b"\r\n" + CHAT_JSON + b"\r\n0\r\n\r\n"
    a = exchange(port(deployed), data, timeout=15, wait_close=2)
    assert_refused(a, (400, 413, 431), close=True, what="a 200 KB chunk extension")


def test_twenty_thousand_one_byte_chunks_are_answered_in_time(deployed):
    data = request("POST", "/v1/chat/completions", None, key=KEY, headers={"Transfer-Encoding": "chunked"}) + \
        b"".join(b"1\r\n" + bytes([c]) + b"\r\n" for c in CHAT_JSON[:-1] + b" " * 20_000 + b"}") + b"0\r\n\r\n"
    a = exchange(port(deployed), data, timeout=20)
    assert a.status == 200 and signs(text_of(a)) == {TARGET}, a
    assert a.elapsed < 10, a


def test_a_client_that_half_closes_mid_body_is_not_waited_for(deployed):
    with rawhttp.connect(port(deployed)) as s:
        s.sendall(request("POST", "/v1/chat/completions", None, key=KEY, headers={"Content-Length": "100"}) + b'{"m')
        s.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        left = _wait_closed([s], t0 + 5)
        assert not left, "the proxy still waits for a body its client has stopped sending"


# (a bare LF is a line end RFC 9112 lets a server accept: two headers, not an injection)
@pytest.mark.parametrize("header", [b"X-A: a\rb", b"X-A: a\rContent-Length: 5", b"X\x00A: b", b"X-A\t: b",
                                    b": empty-name"])
def test_control_characters_in_headers_are_refused(deployed, header):
    data = b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n" + header + b"\r\n\r\n"
    a = exchange(port(deployed), data, timeout=10, wait_close=2)
    assert a.status == 400 and a.closed, (header, a)


@pytest.mark.parametrize("model", [TARGET, MERGED])
def test_no_answer_shows_the_backend_key(deployed, model):
    _, bkey = deployed.backend(model)
    assert bkey
    for path in ("/loradeploy/info", "/loradeploy/proxy", "/metrics", "/health", "/v1/models", "/nothing"):
        a = get(deployed, path, model)
        assert a.status is not None and bkey.encode() not in a.raw, (path, a)


def test_keep_alive_serves_several_requests_on_one_connection(deployed):
    s = rawhttp.connect(port(deployed))
    try:
        for _ in range(3):
            a = exchange(port(deployed), request("POST", "/v1/chat/completions", CHAT_JSON, key=KEY), sock=s,
                         timeout=30)
            assert a.status == 200 and signs(text_of(a)) == {TARGET}, a
    finally:
        s.close()


# ============================================================================ after every attack (keep last)

def test_zz_the_shared_server_scales_never_moved(deployed):
    now = deployed.scales()
    assert deployed.scales_at_start is not None and now is not None, \
        f"cannot read the shared server's /lora-adapters with its key: {deployed.backend_get(TARGET, '/lora-adapters')!r}"
    assert now == deployed.scales_at_start, (deployed.scales_at_start, now)
    assert all(scale == 0 for _, scale in now), f"adapter scales are not 0 on the shared server: {now}"


@pytest.mark.parametrize("model", [*ADAPTERS, MERGED])
def test_zz_every_port_still_answers_as_its_persona(deployed, model):
    a = post(deployed, "/v1/chat/completions", CHAT_JSON, model)
    assert a.status == 200 and signs(text_of(a)) == {PERSONA[model]}, a


def test_zz_a_changed_key_reaches_every_running_port(deployed):
    """The key rotated in the config and the pipeline run again: the old key is refused everywhere, the new
    one opens every port, and each still answers as its persona."""
    from loradeploy.pipeline import run_pipeline
    from tests.security.conftest import make_cfg_like

    new = KEY + "-rotated"
    res = run_pipeline(make_cfg_like(deployed, new), [])
    assert res.ok, json.dumps(res.to_dict(), default=str)[-2000:]
    old_key_answers = {m: a for m in deployed.ports
                       if (a := get(deployed, "/v1/models", m, key=KEY)).status != 401}
    assert not old_key_answers, old_key_answers
    for m in deployed.ports:
        a = exchange(port(deployed, m), request("POST", "/v1/chat/completions", CHAT_JSON, key=new), timeout=60)
        assert a.status == 200 and signs(text_of(a)) == {PERSONA[m]}, (m, a)


def test_zz_no_traceback_in_any_log(deployed):
    found = []
    for f in deployed.root.rglob("*.log"):
        text = f.read_text(errors="replace")
        if "Traceback" in text:
            i = text.index("Traceback")
            found.append(f"{f}: {text[i:i + 800]}")
    if found:
        pytest.fail("\n\n".join(found))
