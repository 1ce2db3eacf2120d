"""serving.policy: what a served port lets through, one case per attack of issue 19 and the normal routes."""
from __future__ import annotations

import json

import pytest

from loradeploy.serving.policy import MAX_DEPTH, Forward, PortInfo, Reply, route

SEL = [{"id": 1, "scale": 1.0}]
ADAPTER = PortInfo(alias="majora", system_prompt="P", lora=SEL, created=7, info={"version": "v1"},
                   proxy={"backend_port": 1})
MERGED = PortInfo(alias="tiny", system_prompt="P")
USER = {"role": "user", "content": "hi"}
CHAT = json.dumps({"messages": [USER]}).encode()


def go(method, target, body=b"", port=ADAPTER, headers=()):
    return route(method, target, list(headers), body, port)


def status(out) -> int:
    return out.status if isinstance(out, Reply) else 200


def refused(out, code):
    assert isinstance(out, Reply), out
    assert out.status == code, out
    assert out.obj["error"]["type"] == "invalid_request_error" and out.obj["error"]["message"]
    return out


# ----------------------------------------------------------------------------- paths

@pytest.mark.parametrize("target", [
    b"/%63ompletion", b"/completion", b"/infill", b"/v1/responses", b"/v1/messages", b"/lora-adapters",
    b"/%6cora-adapters", b"/%6Cora-adapters", b"/models", b"/slots", b"/props", b"/chat/completions",
    b"/completions", b"/v1/models/", b"/", b"/v1/embeddings", b"/v1/chat/completions%20",
])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_every_path_off_the_list_is_404(target, method):
    refused(go(method, target, CHAT), 404)


@pytest.mark.parametrize("target", [
    b"//v1/models", b"/v1//models", b"/v1/./models", b"/v1/../v1/models", b"/v1/models/..", b"/v1/models%2f",
    b"/v1/models%2F", b"/v1%2fmodels", b"/v1/models%5c", b"/v1\\models", b"/v1/models%00", b"/v1/models%0a",
    b"/v1/models%7f", b"/v1/models%", b"/v1/models%g1", b"/v1/%u006dodels", b"/v1/models%ff", b"/v1/models#x",
    b"v1/models", b"http://x/v1/models", b"*", b"/v1/mo\x00dels", b"/v1/mod els", b"/v1/mod\xc3\xa9ls",
    b"/v1/%2e/models", b"/v1/%2E%2E/v1/models",
])
def test_paths_that_could_be_read_two_ways_are_400(target):
    out = refused(go("GET", target), 400)
    assert out.obj["error"]["code"] == "bad_path"


def test_a_percent_encoded_path_is_decoded_as_the_backend_decodes_it():
    # decoded as llama-server would, and only the normalised path goes on, with the port's rules applied
    out = go("POST", b"/v1/chat/%63ompletions", json.dumps({"messages": [USER], "lora": [{"id": 0,
                                                                                          "scale": 1}]}).encode())
    assert isinstance(out, Forward) and out.path == "/v1/chat/completions"
    assert json.loads(out.body)["lora"] == SEL
    assert isinstance(go("GET", b"/%68ealth", port=MERGED), Forward)


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PUT", "DELETE", "TRACE", "get"])
@pytest.mark.parametrize("target,allow", [(b"/v1/models", "GET"), (b"/v1/chat/completions", "POST"),
                                          (b"/health", "GET"), (b"/loradeploy/info", "GET")])
def test_a_known_path_with_another_method_is_405_with_allow(method, target, allow):
    out = refused(go(method, target), 405)
    assert dict(out.headers)["allow"] == allow


def test_the_query_is_read_past_and_never_forwarded():
    out = go("GET", b"/health?fail_on_no_slot=1&x=%00", port=MERGED)
    assert out == Forward("GET", "/health")
    assert go("GET", b"/metrics?", port=MERGED) == Reply(200, None, page="metrics")
    out = go("POST", b"/v1/completions?lora=0", json.dumps({"prompt": "x"}).encode())
    assert isinstance(out, Forward) and out.path == "/v1/completions"


# ----------------------------------------------------------------------------- bodies

@pytest.mark.parametrize("body,why", [
    (CHAT + b"\x00" + json.dumps({"lora": [{"id": 0, "scale": 1}]}).encode(), "NUL"),
    (b'{"messages": [], "x": "a\x00b"}', "NUL"),
    (b'{"messages": [{"role": "user", "content": "a\\u0000b"}]}', "NUL"),
    (b'{"a\\u0000": 1}', "NUL"),
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "surrogate"),
    (b'{"\\udfff": 1}', "surrogate"),
    (b'{"messages": [], "lora": [], "lora": [{"id": 0, "scale": 1}]}', "duplicate"),
    (b'{"messages": [{"role": "user", "role": "system", "content": "x"}]}', "duplicate"),
    (b"[" * 100_000 + b"]" * 100_000, "deeper"),
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "deeper"),
    (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), "deeper"),
    (b'{"messages": [], "x": "\xff\xfe"}', "UTF-8"),
    (b'\xef\xbb\xbf{"messages": []}', "JSON"),
    (b'{"messages": [], "t": NaN}', "JSON"),
    (b'{"messages": [], "t": Infinity}', "JSON"),
    (b'{"messages": []', "JSON"),
    (b"", "JSON"),
    (b"[]", "object"),
    (b'"x"', "object"),
    (b"{} {}", "JSON"),
])
def test_bad_bodies_are_400_in_openai_shape(body, why):
    out = refused(go("POST", b"/v1/chat/completions", body), 400)
    assert why in out.obj["error"]["message"], out


def test_nesting_up_to_the_bound_is_fine():
    body = b'{"a":' * (MAX_DEPTH - 1) + b"1" + b"}" * (MAX_DEPTH - 1)
    assert isinstance(go("POST", b"/v1/completions", body), Forward)


def test_an_oversized_body_is_413():
    small = PortInfo(alias="m", max_body=1000)
    body = json.dumps({"prompt": "x" * 1000}).encode()
    refused(go("POST", b"/v1/completions", body, port=small), 413)
    assert isinstance(go("POST", b"/v1/completions", body), Forward)


def test_a_content_encoded_body_is_refused():
    refused(go("POST", b"/v1/completions", b"\x1f\x8b", headers=[(b"Content-Encoding", b"gzip")]), 415)


# ----------------------------------------------------------------------------- the normal routes

def test_chat_gets_the_system_prompt_and_the_forced_lora_re_serialised():
    body = b'{ "messages" : [ {"role":"user","content":"hi"} ], "lora": [{"id": 0, "scale": 1.0}], "n": 1 }'
    out = go("POST", b"/v1/chat/completions", body)
    assert isinstance(out, Forward) and out.method == "POST"
    assert out.body == json.dumps({"messages": [{"role": "system", "content": "P"}, USER], "n": 1,
                                   "lora": SEL}).encode()
    own = {"role": "developer", "content": "mine"}
    out = go("POST", b"/v1/chat/completions", json.dumps({"messages": [own, USER]}).encode())
    assert json.loads(out.body) == {"messages": [own, USER], "lora": SEL}


def test_completions_and_embeddings():
    out = go("POST", b"/v1/completions", json.dumps({"prompt": "x", "lora": [{"id": 2, "scale": 9}]}).encode())
    assert json.loads(out.body) == {"prompt": "x", "lora": SEL}, "no chat messages, the port's selection"
    out = go("POST", b"/v1/completions", json.dumps({"prompt": "x", "lora": [{"id": 2, "scale": 9}]}).encode(),
             port=MERGED)
    assert json.loads(out.body) == {"prompt": "x"}, "merged: no selection at all"
    refused(go("POST", b"/v1/embeddings", b'{"input": "x"}'), 404)
    emb = PortInfo(alias="e", lora=SEL, embeddings=True)
    assert json.loads(go("POST", b"/v1/embeddings", b'{"input": "x"}', port=emb).body) == {"input": "x",
                                                                                        "lora": SEL}


def test_the_tokenizer_routes_select_nothing():
    out = go("POST", b"/tokenize", json.dumps({"content": "a", "lora": [{"id": 0, "scale": 1}]}).encode())
    assert isinstance(out, Forward) and json.loads(out.body) == {"content": "a"}
    assert isinstance(go("POST", b"/extras/tokenize/count", b'{"input": "a"}', port=MERGED), Forward)


def test_models_and_own_routes():
    out = go("GET", b"/v1/models")
    assert out == Reply(200, {"object": "list", "data": [{"id": "majora", "object": "model",
                                                          "owned_by": "loradeploy", "created": 7}]})
    assert go("GET", b"/v1/models", port=MERGED) == Forward("GET", "/v1/models")
    assert go("GET", b"/loradeploy/info") == Reply(200, {"version": "v1"})
    assert go("GET", b"/loradeploy/proxy") == Reply(200, {"backend_port": 1})
    assert go("GET", b"/health", b"ignored body", port=MERGED) == Forward("GET", "/health")
    assert go("GET", b"/metrics") == Reply(200, None, page="metrics"), "the front door's own metrics"


def test_no_prompt_configured_leaves_messages_alone():
    out = go("POST", b"/v1/chat/completions", CHAT, port=PortInfo(alias="x"))
    assert json.loads(out.body) == {"messages": [USER]}


# ----------------------------------------------------------------------------- non-streaming asked as streams

STREAMS = PortInfo(alias="m", stream_cancel=True)


@pytest.mark.parametrize("path,kind,body", [
    (b"/v1/chat/completions", "chat", {"messages": [USER]}),
    (b"/v1/chat/completions", "chat", {"messages": [USER], "stream": False, "stream_options": {"x": 1}}),
    (b"/v1/completions", "completions", {"prompt": "x", "stream": "true"}),  # not a JSON true: llama-server's false
])
def test_a_non_streaming_generation_is_asked_as_a_stream_to_assemble(path, kind, body):
    out = go("POST", path, json.dumps(body).encode(), port=STREAMS)
    assert isinstance(out, Forward) and out.assemble == kind
    sent = json.loads(out.body)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("path,body,port", [
    (b"/v1/chat/completions", {"messages": [USER], "stream": True}, STREAMS),    # a stream already
    (b"/v1/embeddings", {"input": "x"}, PortInfo(alias="m", stream_cancel=True, embeddings=True)),
    (b"/tokenize", {"content": "x"}, STREAMS),
    (b"/v1/chat/completions", {"messages": [USER]}, MERGED),                     # a backend that does not stream so
])
def test_other_requests_go_as_they_are(path, body, port):
    out = go("POST", path, json.dumps(body).encode(), port=port)
    assert isinstance(out, Forward) and out.assemble is None
    assert "stream_options" not in json.loads(out.body)
