"""The front proxy in front of a real llama-server (the pinned build, the tiny demo model):

- a non-streaming chat or completion answered through the proxy (which asks llama-server for a stream
  and assembles the answer) equals llama-server's own non-streaming answer at temperature 0: content,
  finish_reason and token counts;
- a non-streaming client that leaves stops its generation at the backend. llama-server itself notices a
  non-streaming client leaving only when no other request's results wake its wait for a second, so
  under load it generates to the end; through the proxy the backend sees a stream whose reader is gone."""
from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loradeploy.serving.control import Control, ProxyConf, save_control, save_proxy_conf
from tests.fixtures.gguf_models import tiny_gguf_cache, tiny_ggufs  # noqa: F401  (fixtures)
from tests.unit.test_front_http import _free_port

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [[{"role": "user", "content": "Repeat these words: apple river stone"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to five."}]]


def _post(port: int, path: str, body: dict, key: str | None = None, timeout: float = 60) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    c.request("POST", path, body=json.dumps(body), headers=headers)
    r = c.getresponse()
    return r.status, json.loads(r.read())


def _wait_http(port: int, proc: subprocess.Popen, log: Path, path: str = "/health", key: str | None = None) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path, headers={"authorization": f"Bearer {key}"} if key else {})
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"nothing answered on {port}: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tiny_ggufs, tmp_path_factory):
    """llama-server with its own key (2 slots) and our proxy in front of it."""
    from loradeploy.llamacpp import runtime
    from loradeploy.llamacpp.tools import tool

    tmp = tmp_path_factory.mktemp("front-proxy")
    gguf = tiny_ggufs["v1", "Q8_0"]
    key = secrets.token_urlsafe(24)
    (tmp / "key").write_text(key)
    os.chmod(tmp / "key", 0o600)
    bport, pport = _free_port(), _free_port()
    argv = [str(tool("llama-server")), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(bport), "-c", "8192",
            "-np", "2", "-t", "1", "-tb", "1", "--metrics", "--no-webui", "--api-key-file", str(tmp / "key"),
            "-ngl", "0", "--alias", "tiny"]
    if not runtime.decide().extra_bufts:
        argv.append("--no-repack")
    blog = tmp / "server.log"
    backend = subprocess.Popen(argv, stdout=open(blog, "wb"), stderr=subprocess.STDOUT)
    save_control(Control(backend_port=bport, version="v1", format="Q8_0", sha256="x", gguf=str(gguf),
                         backend="llama-server", backend_key=key), tmp / "control.json")
    save_proxy_conf(ProxyConf(alias="tiny", host="127.0.0.1", port=pport, control=str(tmp / "control.json")),
                    tmp / "proxy.json")
    plog = tmp / "proxy.log"
    proxy = subprocess.Popen([sys.executable, "-m", "loradeploy.serving.worker", "proxy", str(tmp / "proxy.json")],
                             cwd=ROOT, stderr=open(plog, "wb"))
    try:
        _wait_http(bport, backend, blog, "/v1/models", key)
        _wait_http(pport, proxy, plog)
        yield {"backend": bport, "proxy": pport, "key": key, "proxy_log": plog}
    finally:
        for p in (proxy, backend):
            p.terminate()
            p.wait(15)
    assert "Traceback" not in plog.read_text(), plog.read_text()


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": MESSAGES[0]}),
    ("/v1/chat/completions", {"messages": MESSAGES[1], "logprobs": True, "top_logprobs": 2}),
    ("/v1/completions", {"prompt": "Once upon a time"}),
])
def test_non_streaming_answers_equal_the_backends_own(served, path, body):
    body = {**body, "max_tokens": 24, "temperature": 0, "seed": 1}
    status, direct = _post(served["backend"], path, body, served["key"])
    assert status == 200, direct
    status, proxied = _post(served["proxy"], path, body)
    assert status == 200, proxied
    assert set(direct) - {"__verbose"} == set(proxied), (sorted(direct), sorted(proxied))
    for k in ("object", "model", "system_fingerprint"):
        assert proxied[k] == direct[k], k
    want, got = direct["choices"][0], proxied["choices"][0]
    assert got["finish_reason"] == want["finish_reason"]
    if path.endswith("chat/completions"):
        assert got["message"] == want["message"]
    else:
        assert got["text"] == want["text"] and got["text"]
    if "logprobs" in body:
        # the same entries, but for the stop token's, which llama-server's stream never carries
        streamed, whole = got["logprobs"]["content"], want["logprobs"]["content"]
        if want["finish_reason"] == "stop" and len(whole) == len(streamed) + 1:
            assert whole[-1]["token"] == "", whole[-1]
            whole = whole[:-1]
        assert streamed == whole
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert proxied["usage"][k] == direct["usage"][k], k
    assert proxied["timings"]["predicted_n"] == direct["timings"]["predicted_n"]


def _slots(served) -> list[dict]:
    c = http.client.HTTPConnection("127.0.0.1", served["backend"], timeout=10)
    c.request("GET", "/slots", headers={"authorization": f"Bearer {served['key']}"})
    return json.loads(c.getresponse().read())


def _long(**kw) -> bytes:
    return json.dumps({"messages": MESSAGES[0], "max_tokens": 3000, "ignore_eos": True, "temperature": 0,
                       **kw}).encode()


def test_a_non_streaming_client_that_leaves_stops_its_generation(served):
    """One stream keeps llama-server busy (as other clients would); a non-streaming client asks through
    the proxy for 3000 tokens and leaves after a second: its slot stops, the busy one goes on."""
    busy_done = threading.Event()

    def busy():
        c = http.client.HTTPConnection("127.0.0.1", served["backend"], timeout=120)
        c.request("POST", "/v1/chat/completions", body=_long(stream=True),
                  headers={"authorization": f"Bearer {served['key']}", "content-type": "application/json"})
        c.getresponse().read()
        busy_done.set()

    threading.Thread(target=busy, daemon=True).start()
    time.sleep(0.5)
    body = _long()
    with socket.create_connection(("127.0.0.1", served["proxy"]), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(1.0)
        at_leave = {sl["id"]: sl["next_token"][0]["n_decoded"] for sl in _slots(served) if sl["is_processing"]}
    assert len(at_leave) == 2, "both requests were generating when the client left"
    end = time.monotonic() + 5
    while time.monotonic() < end:
        working = [sl for sl in _slots(served) if sl["is_processing"]]
        if len(working) <= 1:
            break
        time.sleep(0.1)
    assert len(working) == 1 and not busy_done.is_set(), "the leaving client's generation went on"
    stopped_at = max(n for i, n in at_leave.items() if i != working[0]["id"])
    assert stopped_at < 3000
    busy_done.wait(120)


def test_metrics_relay_the_backends_slot_gauges_and_health_reads_them(served):
    """The port's /metrics is its own, plus llama-server's ``llamacpp:*`` series asked with the backend's key
    (the client never sees or needs that key); health's server check reads slot use from it."""
    from loradeploy.config import HealthCheckConfig
    from loradeploy.health.api import prometheus_values, server_checks
    from loradeploy.tools.openai_http import Client

    status, _ = _post(served["proxy"], "/v1/completions", {"prompt": "a", "max_tokens": 2, "temperature": 0})
    assert status == 200
    c = http.client.HTTPConnection("127.0.0.1", served["proxy"], timeout=10)
    c.request("GET", "/metrics")
    r = c.getresponse()
    text = r.read().decode()
    assert r.status == 200 and "loradeploy_backend_metrics_up 1" in text, text[-2000:]
    ours = [line for line in text.splitlines() if line.startswith("loradeploy_requests_total")]
    assert ours and any('route="/v1/completions"' in line for line in ours), ours
    relayed = prometheus_values(text)
    assert relayed.get("tokens_predicted_total", 0) >= 2 and "requests_processing" in relayed, relayed
    assert not any(line and not line.startswith(("loradeploy_", "llamacpp:", "# ")) for line in text.splitlines())
    check, = server_checks(Client(f"http://127.0.0.1:{served['proxy']}"), None, HealthCheckConfig())
    assert check.status == "pass" and "requests_processing" in check.metrics, check
