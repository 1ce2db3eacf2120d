"""Backends locked with their own keys (issue 19, item 4), on real servers over loopback.

* every backend starts with a random key that only its front proxy (and loradeploy) holds: from loopback
  without it, every route but llama-server's /health answers 401, and the key is on no command line;
* a key added to (or changed in) the config of a running deployment reaches every running port on the
  next deploy, without a restart of its backend or proxy, merged and adapter mode alike;
* right after an adapter-mode deploy, every adapter on the shared server is at scale 0.
"""
from __future__ import annotations

import http.client
import json
import stat
from pathlib import Path

import psutil
import pytest

from loradeploy.config import config_from_dict
from loradeploy.serving.backends import read_key
from loradeploy.serving.launch import start_backend
from loradeploy.tools import proc
from tests.fixtures.gguf_models import *  # noqa: F401,F403  (tiny_ggufs, tiny_gguf_cache)
from tests.fixtures.servers import deploy, served, stop_model_servers
from tests.integration.test_deploy import MODEL, cfg_factory, free_port, with_version  # noqa: F401

LOCKED = [("GET", "/v1/models"), ("GET", "/models"), ("GET", "/slots"), ("GET", "/metrics"), ("GET", "/props"),
          ("GET", "/lora-adapters"), ("POST", "/lora-adapters"), ("POST", "/v1/chat/completions"),
          ("POST", "/completion"), ("POST", "/v1/completions"), ("POST", "/v1/responses"), ("POST", "/v1/messages"),
          ("POST", "/tokenize"), ("POST", "/infill")]
CHAT = {"messages": [{"role": "user", "content": "echo: apple river"}], "max_tokens": 2, "temperature": 0}


def call(port: int, method: str, path: str, body: dict | list | None = None, key: str | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
        conn.request(method, path, body=json.dumps(body if body is not None else {}) if method == "POST" else None,
                     headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_locked(port: int, key: str, routes=LOCKED) -> None:
    got = {f"{m} {p}": call(port, m, p, [{"id": 0, "scale": 1.0}] if "lora" in p else CHAT) for m, p in routes}
    assert set(got.values()) == {401}, got
    assert call(port, "GET", "/v1/models", key=key) == 200
    assert call(port, "GET", "/v1/models", key=key + "x") == 401


@pytest.mark.parametrize("backend", ["llama-server", "python"])
def test_a_backend_refuses_everything_without_its_key(tmp_path, tiny_ggufs, backend):
    cfg = config_from_dict({
        "models": {MODEL: {"base_model": str(tmp_path / "b"), "adapter": str(tmp_path / "a"), "port": free_port()}},
        "deployment": {"llamacpp": {"n_ctx": 256, "threads": 1, "startup_timeout_s": 120, "backend": backend}},
        "pipeline": {"state_dir": str(tmp_path / "state"), "work_dir": str(tmp_path / "work")},
        "logging": {"log_dir": str(tmp_path / "logs")}})
    started = start_backend(cfg, MODEL, tiny_ggufs["v1", "Q8_0"], log_path=tmp_path / "server.log", conf_dir=tmp_path)
    try:
        rec, key = started.record, started.key
        key_file, conf = Path(rec["key_file"]), Path(rec["config"])
        assert read_key(key_file) == key and len(key) >= 40
        assert _mode(key_file) == 0o600 and _mode(conf) == 0o600
        assert key not in conf.read_text()
        server = json.loads(Path(rec["server_record"]).read_text())
        for pid in (rec["pid"], server["pid"]):  # the supervisor's and the server's command lines
            assert not any(key in a for a in psutil.Process(pid).cmdline())
        if backend == "llama-server":
            assert "--api-key-file" in psutil.Process(server["pid"]).cmdline()
            assert call(rec["port"], "GET", "/health") == 200  # exempt by llama-server's design
            _assert_locked(rec["port"], key)
        else:  # llama-cpp-python's routes
            _assert_locked(rec["port"], key, [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                             ("POST", "/v1/completions"), ("POST", "/extras/tokenize")])
    finally:
        proc.stop(started.record, grace=10)


@pytest.mark.slow
def test_a_key_added_to_a_running_deployment_locks_its_port(cfg_factory, tiny_ggufs):
    cfg = cfg_factory()
    port, v1 = cfg.models[MODEL].port, tiny_ggufs["v1", "Q8_0"]
    deploy(cfg, MODEL, v1)
    before = served(cfg, MODEL)
    backend_key = read_key(before.backend.key_file)
    assert backend_key and call(before.backend.port, "GET", "/v1/models") == 401
    assert call(port, "GET", "/v1/models") == 200 and call(port, "POST", "/v1/chat/completions", CHAT) == 200

    for key in ("first-key-0123456789", "second-key-0123456789"):
        keyed = with_key(cfg, key)
        res = deploy(keyed, MODEL, v1)
        assert res["targets"]["llamacpp"]["action"] == "reconfigured", res
        after = served(keyed, MODEL)
        assert (after.proxy.pid, after.backend.pid) == (before.proxy.pid, before.backend.pid), "nothing restarted"
        assert call(port, "GET", "/v1/models") == 401
        assert call(port, "GET", "/v1/models", key=key) == 200
        assert call(port, "POST", "/v1/chat/completions", CHAT, key=key) == 200
        assert call(port, "GET", "/v1/models", key="first-key-0123456789") == (200 if key.startswith("first") else 401)
        assert call(port, "GET", "/v1/models", key=backend_key) == 401, "the backend's key is no client key"


def with_key(cfg, key: str):
    from pydantic import SecretStr

    llamacpp = cfg.deployment.llamacpp.model_copy(update={"api_key": SecretStr(key)})
    return cfg.model_copy(update={"deployment": cfg.deployment.model_copy(update={"llamacpp": llamacpp})})


# ----------------------------------------------------------------------------- adapter mode

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_adapter_mode_scales_are_zero_and_a_new_key_reaches_every_port(tmp_path):
    from loradeploy.pipeline import run_pipeline
    from tests.integration.test_adapter_mode import MODELS, make_cfg, signs, ask
    from tests.fixtures.models import _build

    pairs = {p: _build("llama", p) for p in MODELS}
    personas = pairs["majora"][0], {p: a for p, (_, a) in pairs.items()}
    ports = {m: free_port() for m in MODELS}
    cfg = make_cfg(tmp_path, personas, ports=ports)
    try:
        res = run_pipeline(cfg, [])
        assert res.ok, res.to_dict()
        shared = served(cfg, MODELS[0]).backend
        key = read_key(shared.key_file)
        assert key and call(shared.port, "GET", "/lora-adapters") == 401
        conn = http.client.HTTPConnection("127.0.0.1", shared.port, timeout=30)
        conn.request("GET", "/lora-adapters", headers={"authorization": f"Bearer {key}"})
        adapters = json.loads(conn.getresponse().read())
        conn.close()
        assert len(adapters) == len(MODELS) and all(a["scale"] == 0.0 for a in adapters), adapters
        for m in MODELS:
            assert signs(ask(ports[m])) == {m}

        keyed = with_key(cfg, "adapter-mode-key-0123456789")
        pids = {m: (served(cfg, m).proxy.pid, served(cfg, m).backend.pid) for m in MODELS}
        res2 = run_pipeline(keyed, [])
        assert res2.ok, res2.to_dict()
        for m in MODELS:
            assert call(ports[m], "GET", "/v1/models") == 401
            assert call(ports[m], "GET", "/v1/models", key="adapter-mode-key-0123456789") == 200
            assert (served(keyed, m).proxy.pid, served(keyed, m).backend.pid) == pids[m], "nothing restarted"
    finally:
        for m in MODELS:
            stop_model_servers(cfg, m)
