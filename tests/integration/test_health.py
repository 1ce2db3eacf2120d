"""Health checks against real servers on loopback: llama.cpp's OpenAI server with the tiny demo
model, a server answering 500, a server that accepts and never answers, one that stops mid-stream."""
from __future__ import annotations

import io
import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from loradeploy.config import config_from_dict
from loradeploy.errors import HealthError
from loradeploy.fsutil import sha256_file
from loradeploy.health import (DEGRADED, FAIL, HEALTHY, PASS, SKIP, UNHEALTHY, WARN, check_health, exit_code,
                               probe, render)
from loradeploy.serving import Endpoint
from loradeploy.stages.base import ModelPaths, StageContext
from loradeploy.stages.health import HealthStage
from tests.fixtures.gguf_models import *  # noqa: F401,F403 (tiny_ggufs, tiny_gguf_cache)
from tests.fixtures.receivers import closed_port, free_port, silent_port  # noqa: F401
from tests.unit.test_openai_http import LoopbackApi

MODEL = "tiny"
PROMPT = "echo: apple river"  # the demo base's task: a short answer and a stop token


BACKEND_KEYS: dict[int, str] = {}  # a real backend's port -> its own key (the checks reach it directly)


def _cfg(tmp_path: Path, port: int, *, llamacpp: dict | None = None, **hc) -> "object":
    if port in BACKEND_KEYS and llamacpp is None:
        llamacpp = {"api_key": BACKEND_KEYS[port]}
    health = {"timeout_s": 60, "test_prompts": [PROMPT], "max_tokens": 16, "max_latency_s": 60,
              "min_tokens_per_s": 0.01, "min_free_disk_gb": 0, "min_free_memory_gb": 0, **hc}
    return config_from_dict({
        "models": {MODEL: {"base_model": str(tmp_path / "base"), "adapter": str(tmp_path / "adapter"),
                           "port": port}},
        "health_check": health,
        "deployment": {"models_dir": str(tmp_path / "models"), "llamacpp": llamacpp or {}},
        "pipeline": {"work_dir": str(tmp_path / "work"), "state_dir": str(tmp_path / "state")},
        "logging": {"log_dir": str(tmp_path / "logs")},
    }, base_dir=tmp_path)


def _endpoint(port: int, gguf: Path | None = None, pid: int = 0, sha256: str | None = None) -> Endpoint:
    sha = sha256 if sha256 is not None else (sha256_file(gguf) if gguf else "")
    return Endpoint(MODEL, "v1", "Q8_0", f"http://127.0.0.1:{port}", port, pid, str(gguf) if gguf else "", sha or None)


def _check(checks, name):
    found = [c for c in checks if c.name == name]
    assert found, f"no {name} check in {[c.name for c in checks]}"
    return found[0]





class LlamaServer:
    """A real llama.cpp server started the way loradeploy starts one (serving.launch, runtime CPU mode)."""

    def __init__(self, gguf: Path, log: Path):
        from loradeploy.config import config_from_dict
        from loradeploy.serving.launch import start_backend

        root = log.parent
        cfg = config_from_dict({
            "models": {MODEL: {"base_model": str(root / "base"), "adapter": str(root / "adapter"), "port": free_port()}},
            "deployment": {"llamacpp": {"n_ctx": 512, "threads": 1, "startup_timeout_s": 120}},
            "pipeline": {"state_dir": str(root / "state"), "work_dir": str(root / "work")},
            "logging": {"log_dir": str(root / "logs")}})
        self.gguf = gguf
        self.started = start_backend(cfg, MODEL, gguf, log_path=log, conf_dir=root)
        self.port, self.pid = self.started.record["port"], self.started.record["pid"]
        BACKEND_KEYS[self.port] = self.started.key

    def stop(self) -> None:
        from loradeploy.tools import proc

        proc.stop(self.started.record, grace=20)


@pytest.fixture(scope="module")
def tiny_q8(tiny_ggufs) -> Path:
    return tiny_ggufs[("v1", "Q8_0")]


@pytest.fixture(scope="module")
def llama_server(tiny_q8, tmp_path_factory):
    server = LlamaServer(tiny_q8, tmp_path_factory.mktemp("llama") / "server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def live(llama_server):
    return _endpoint(llama_server.port, llama_server.gguf, llama_server.pid)


# ----------------------------------------------------------------------------- a real llama.cpp server

def test_real_server_is_healthy_with_numbers(tmp_path, live):
    cfg = _cfg(tmp_path, live.port)
    report = check_health(cfg, endpoints=[live])
    m = report.models[MODEL]
    assert report.status == HEALTHY, [c.to_dict() for c in m.checks + report.system if c.status != PASS]
    assert exit_code(report) == 0
    for name in ("file.exists", "file.structure", "file.sha256", "api.port", "api.models", "model.completion",
                 "model.performance", "system.process"):
        assert _check(m.checks, name).status == PASS
    answer = _check(m.checks, "model.completion").metrics
    assert answer["finish_reason"] == "stop" and answer["answer"].strip()
    fidelity = _check(m.checks, "verify.fidelity")  # never verified: said so, without changing the verdict
    assert fidelity.status == "skip" and "loradeploy verify --model" in fidelity.remedy
    metrics = m.metrics
    assert metrics["latency_s"] > 0 and metrics["tokens_per_s"] > 0 and metrics["completion_tokens"] >= 1
    assert 0 < metrics["ttft_s"] <= metrics["latency_s"]
    assert metrics["rss_mib"] > 10
    data = json.loads(json.dumps(report.to_dict()))
    assert data["status"] == HEALTHY and data["exit_code"] == 0
    assert data["models"][MODEL]["metrics"]["tokens_per_s"] == metrics["tokens_per_s"]
    assert {c["name"] for c in data["system"]["checks"]} >= {"system.disk", "system.memory", "system.gpu"}
    from rich.console import Console
    console = Console(file=io.StringIO(), width=160, record=True)
    console.print(render(report))
    text = console.export_text()
    assert "HEALTHY" in text and "model.completion" in text and "exit code 0" in text
    print(f"\nhealthy: latency {metrics['latency_s']}s ttft {metrics['ttft_s']}s "
          f"{metrics['tokens_per_s']} tok/s rss {metrics['rss_mib']} MiB, report {report.seconds}s")


def test_degraded_when_too_slow_or_low_disk(tmp_path, live):
    report = check_health(_cfg(tmp_path, live.port, min_tokens_per_s=1e9, min_free_disk_gb=1e6), endpoints=[live])
    assert report.status == DEGRADED and exit_code(report) == 1
    perf = _check(report.models[MODEL].checks, "model.performance")
    assert perf.status == WARN and "min_tokens_per_s" in perf.detail and perf.remedy
    disk = _check(report.system, "system.disk")
    assert disk.status == WARN and "low disk" in disk.detail and "keep_backups" in disk.remedy
    assert report.models[MODEL].metrics["tokens_per_s"] > 0  # degraded still reports the numbers


def test_answer_cut_by_max_tokens_is_a_warning(tmp_path, live):
    report = check_health(_cfg(tmp_path, live.port, max_tokens=1), endpoints=[live])
    c = _check(report.models[MODEL].checks, "model.completion")
    assert c.status == WARN and c.metrics["finish_reason"] == "length" and "max_tokens=1" in c.detail
    assert report.status == DEGRADED


def test_probe_without_prompts_is_a_readiness_probe(tmp_path, live):
    cfg = _cfg(tmp_path, live.port)
    checks = probe(live, cfg.health_check, prompts=[], files=False, api_key=BACKEND_KEYS[live.port])
    assert [c.name for c in checks] == ["api.port", "api.models", "system.process"]
    assert all(c.status == PASS for c in checks)


def _ctx(tmp_path: Path, cfg) -> StageContext:
    paths = ModelPaths(cfg.pipeline.work_dir / MODEL, MODEL, "v1")
    return StageContext(cfg, MODEL, logging.getLogger("test.health"), tmp_path / "health.log", paths)


def test_stage_reports_metrics_and_is_never_current(tmp_path, live):
    cfg = _cfg(tmp_path, live.port)
    stage = HealthStage(endpoints=[live])
    ctx = _ctx(tmp_path, cfg)
    ctx.upstream = {"deploy": {"artifacts": [{"path": live.gguf_path, "kind": "gguf", "format": "Q8_0",
                                              "sha256": live.sha256}]}}
    assert stage.inputs(ctx)["gguf_sha256"] == live.sha256
    assert stage.is_current(ctx, {"status": "done"}) == (False, "health is always re-checked")
    result = stage.run(ctx)
    assert result.info["status"] == HEALTHY
    assert result.info["metrics"]["latency_s"] > 0 and result.info["metrics"]["tokens_per_s"] > 0
    saved = json.loads(Path(result.info["report"]).read_text())
    assert saved["models"][MODEL]["status"] == HEALTHY


def test_stopping_the_server_makes_it_unhealthy(tmp_path, tiny_q8):
    server = LlamaServer(tiny_q8, tmp_path / "server.log")
    ep = _endpoint(server.port, tiny_q8, server.pid)
    cfg = _cfg(tmp_path, server.port)
    try:
        assert check_health(cfg, endpoints=[ep], include_model_test=False).status == HEALTHY
    finally:
        server.stop()
    t0 = time.monotonic()
    report = check_health(cfg, endpoints=[ep])
    assert time.monotonic() - t0 < 10
    assert report.status == UNHEALTHY and exit_code(report) == 2
    assert report.model_statuses() == {MODEL: UNHEALTHY} and "api.port" in report.problems(MODEL)
    checks = report.models[MODEL].checks
    port = _check(checks, "api.port")
    assert port.status == FAIL and "connection refused" in port.detail and "serve start -m tiny" in port.remedy
    assert _check(checks, "system.process").status == FAIL
    assert _check(checks, "model.completion").status == SKIP
    assert _check(checks, "file.structure").status == PASS  # the file is fine; the server is not
    with pytest.raises(HealthError, match="api.port"):
        HealthStage(endpoints=[ep]).run(_ctx(tmp_path, cfg))


# ----------------------------------------------------------------------------- misbehaving servers

SECRET = "hc-Secret-Key-0123456789"


class FakeApi(LoopbackApi):
    """A real HTTP server whose answers a test chooses: 'error' (500 everywhere), 'chat500'
    (models listed, completions 500), 'stall' (streams one token, then goes silent), 'auth'
    (401 without ``Authorization: Bearer SECRET``, else a short streamed answer)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.auth_seen: list[str | None] = []
        super().__init__()

    def _refused(self, h) -> bool:
        self.auth_seen.append(h.headers.get("Authorization"))
        if self.mode != "auth" or h.headers.get("Authorization") == f"Bearer {SECRET}":
            return False
        self.send(h, 401, b'{"error": {"message": "Invalid API Key", "type": "authentication_error"}}')
        return True

    def get(self, h) -> None:
        if self._refused(h):
            return
        if self.mode == "error":
            return self.send(h, 500, b'{"error": "model crashed: out of memory"}')
        self.send(h, 200, json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode())

    def post(self, h) -> None:
        self.read_json(h)
        if self._refused(h):
            return
        if self.mode in ("error", "chat500"):
            return self.send(h, 500, b'{"error": "internal error"}')
        self.sse_start(h)
        chunk = {"choices": [{"index": 0, "delta": {"content": "hel"}, "finish_reason": None}]}
        h.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        h.wfile.flush()
        if self.mode == "auth":
            end = {"choices": [{"index": 0, "delta": {"content": "lo there"}, "finish_reason": "stop"}]}
            h.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
            return
        self.release.wait(60)


@pytest.fixture
def fake_api(request):
    api = FakeApi(request.param)
    try:
        yield api
    finally:
        api.close()


@pytest.mark.parametrize("fake_api", ["error"], indirect=True)
def test_server_answering_500_is_unhealthy(tmp_path, fake_api):
    ep = _endpoint(fake_api.port)
    report = check_health(_cfg(tmp_path, fake_api.port), endpoints=[ep])
    c = _check(report.models[MODEL].checks, "api.models")
    assert c.status == FAIL and "500" in c.detail and "out of memory" in c.detail and c.remedy
    assert c.metrics["http_status"] == 500
    assert report.status == UNHEALTHY and exit_code(report) == 2


@pytest.mark.parametrize("fake_api", ["chat500"], indirect=True)
def test_completion_answering_500_is_unhealthy(tmp_path, fake_api):
    report = check_health(_cfg(tmp_path, fake_api.port), endpoints=[_endpoint(fake_api.port)])
    checks = report.models[MODEL].checks
    assert _check(checks, "api.models").status == PASS
    c = _check(checks, "model.completion")
    assert c.status == FAIL and "HTTP 500" in c.detail
    assert report.status == UNHEALTHY


def test_hung_server_fails_within_the_timeout(tmp_path, silent_port):
    cfg = _cfg(tmp_path, silent_port, timeout_s=1.5)
    t0 = time.monotonic()
    report = check_health(cfg, endpoints=[_endpoint(silent_port)])
    took = time.monotonic() - t0
    assert took < 1.5 + 2.0, took
    c = _check(report.models[MODEL].checks, "api.models")
    assert c.status == FAIL and "within 1.5s" in c.detail and "hung" in c.detail and "restart" in c.remedy
    assert _check(report.models[MODEL].checks, "api.port").status == PASS
    assert report.status == UNHEALTHY and exit_code(report) == 2


@pytest.mark.parametrize("fake_api", ["stall"], indirect=True)
def test_stream_stalling_midway_fails_within_the_timeout(tmp_path, fake_api):
    cfg = _cfg(tmp_path, fake_api.port, timeout_s=1.5)
    t0 = time.monotonic()
    report = check_health(cfg, endpoints=[_endpoint(fake_api.port)])
    assert time.monotonic() - t0 < 1.5 * 2 + 2.0  # /v1/models and the completion each get the timeout
    c = _check(report.models[MODEL].checks, "model.completion")
    assert c.status == FAIL and "within 1.5s" in c.detail and "timeout_s" in c.remedy
    assert report.status == UNHEALTHY


@pytest.mark.parametrize("fake_api", ["auth"], indirect=True)
def test_api_key_is_sent_and_never_shown(tmp_path, fake_api, caplog):
    ep = _endpoint(fake_api.port)
    cfg = _cfg(tmp_path, fake_api.port, llamacpp={"api_key": SECRET})
    report = check_health(cfg, endpoints=[ep])
    checks = report.models[MODEL].checks
    assert _check(checks, "api.models").status == PASS and _check(checks, "model.completion").status == PASS
    assert set(fake_api.auth_seen) == {f"Bearer {SECRET}"}
    from rich.console import Console
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(render(report))
    assert SECRET not in json.dumps(report.to_dict()) and SECRET not in console.export_text()
    with caplog.at_level(logging.DEBUG):
        HealthStage(endpoints=[ep]).run(_ctx(tmp_path, cfg))
    assert caplog.records and SECRET not in caplog.text

    for key in (None, "not-the-key-42"):
        fake_api.auth_seen.clear()
        cfg = _cfg(tmp_path, fake_api.port, llamacpp={"api_key": key} if key else None)
        report = check_health(cfg, endpoints=[ep])
        c = _check(report.models[MODEL].checks, "api.models")
        assert c.status == FAIL and "401" in c.detail and c.metrics["http_status"] == 401
        assert report.status == UNHEALTHY
        assert fake_api.auth_seen == [f"Bearer {key}" if key else None]  # no Authorization header without a key


# ----------------------------------------------------------------------------- files and system

def test_malformed_gguf_fails_the_file_check_without_loading(tmp_path, tiny_q8, closed_port):
    bad = tmp_path / "bad.gguf"
    data = bytearray(tiny_q8.read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # absurd tensor count
    bad.write_bytes(bytes(data))
    cfg = _cfg(tmp_path, closed_port)
    t0 = time.monotonic()
    checks = probe(_endpoint(closed_port, bad), cfg.health_check)
    assert time.monotonic() - t0 < 5
    c = _check(checks, "file.structure")
    assert c.status == FAIL and "tensor_count" in c.detail and "re-run quantize" in c.remedy

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_q8.read_bytes()[:4096])
    checks = probe(_endpoint(closed_port, truncated, sha256=sha256_file(tiny_q8)), cfg.health_check, prompts=[])
    assert _check(checks, "file.structure").status == FAIL
    sha = _check(checks, "file.sha256")
    assert sha.status == FAIL and "differs from the recorded" in sha.detail


def test_changed_or_missing_file(tmp_path, tiny_q8, closed_port):
    copy = tmp_path / "copy.gguf"
    shutil.copy(tiny_q8, copy)
    hc = _cfg(tmp_path, closed_port).health_check
    with open(copy, "ab") as f:
        f.write(b"\0" * 8)  # still a valid GGUF, but not the deployed bytes
    checks = probe(_endpoint(closed_port, copy, sha256=sha256_file(tiny_q8)), hc, prompts=[])
    assert _check(checks, "file.structure").status != FAIL
    assert _check(checks, "file.sha256").status == FAIL
    checks = probe(_endpoint(closed_port, tmp_path / "gone.gguf", sha256="0" * 64), hc, prompts=[])
    assert _check(checks, "file.exists").status == FAIL and "does not exist" in _check(checks, "file.exists").detail


def test_gpu_check_is_skipped_without_a_gpu(tmp_path, closed_port):
    report = check_health(_cfg(tmp_path, closed_port), endpoints=[])
    gpu = [c for c in report.system if c.name == "system.gpu"]
    try:
        import pynvml
        pynvml.nvmlInit()
        has_gpu = pynvml.nvmlDeviceGetCount() > 0
        pynvml.nvmlShutdown()
    except Exception:
        has_gpu = False
    if has_gpu:
        assert all(c.status in (PASS, WARN) and c.metrics["memory_total_gb"] > 0 for c in gpu)
    else:
        assert len(gpu) == 1 and gpu[0].status == SKIP and "skipped" in gpu[0].detail
    mem = _check(report.system, "system.memory")
    assert mem.status == PASS and mem.metrics["available_gb"] > 0
    # nothing deployed at all is itself a failure
    assert _check(report.system, "deploy.endpoint").status == FAIL and report.status == UNHEALTHY


def test_named_model_without_deployment_is_unhealthy(tmp_path, closed_port):
    report = check_health(_cfg(tmp_path, closed_port), [MODEL], endpoints=[])
    c = _check(report.models[MODEL].checks, "deploy.endpoint")
    assert c.status == FAIL and "not deployed" in c.detail and f"run -m {MODEL}" in c.remedy
    assert exit_code(report) == 2


def test_memory_threshold_warns(tmp_path, live):
    report = check_health(_cfg(tmp_path, live.port, min_free_memory_gb=1e6), endpoints=[live],
                          include_model_test=False)
    mem = _check(report.system, "system.memory")
    assert mem.status == WARN and "low memory" in mem.detail
    assert report.status == DEGRADED


def test_nothing_recorded_by_serve_is_unhealthy(tmp_path, closed_port):
    # No endpoints given: the deployments come from serve's registry, empty here.
    report = check_health(_cfg(tmp_path, closed_port), include_model_test=False)
    assert report.models == {}
    assert _check(report.system, "deploy.endpoint").status == FAIL and exit_code(report) == 2
