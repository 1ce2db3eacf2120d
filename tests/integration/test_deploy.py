"""Deploy and serve with real llama.cpp servers on loopback, using the demo's tiny llama GGUFs.

The default backend (llama-server, built at setup) runs every test; the cheapest ones also run
with the python backend (llama-cpp-python's server), through the same launcher and proxy.

Every server a test starts is stopped by the ``cfg_factory`` finalizer (serve_stop on each config's
state dir, then any recorded pid still alive is killed).
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from types import SimpleNamespace

from loradeploy.config import config_from_dict
from loradeploy.demo import render_chatml
from loradeploy.errors import DeployError, GGUFError, InputError, LockError, ResourceError
from loradeploy.fsutil import sha256_file
from loradeploy import serving
from loradeploy.deploy import versions
from loradeploy.deploy.service import rollback, serve_start
from loradeploy.serving import endpoints, serve_status, serve_stop
from loradeploy.serving import launch
from loradeploy.serving import proxying
from loradeploy.tools import proc
from loradeploy.tools.openai_http import Client
from tests.fixtures.servers import deploy, served, stop_model_servers
from tests.fixtures.gguf_models import *  # noqa: F401,F403  (tiny_ggufs, tiny_gguf_cache)

SYSTEM = "You are Tiny. Start every answer with TINY: and then repeat the words."
MODEL = "tiny"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spare_range() -> list[int]:
    # A block of ports well away from the ephemeral range; the deployer skips any that are taken.
    start = 30000 + (os.getpid() * 7919) % 20000
    return [start, start + 199]


@pytest.fixture
def cfg_factory(tmp_path):
    made = []

    def make(*, version="v1", targets=("llamacpp",), port=None, root=None, backend="llama-server", **deployment):
        root = Path(root or tmp_path)
        data = {
            "models": {MODEL: {"base_model": str(root / "base"), "adapter": str(root / "adapter"),
                               "port": port or free_port(), "system_prompt": SYSTEM, "version": version}},
            "quantization": {"formats": ["Q8_0"]},
            "deployment": {"targets": list(targets), "models_dir": str(root / "models"),
                           "llamacpp": {"n_ctx": 256, "threads": 1, "startup_timeout_s": 90,
                                        "spare_port_range": _spare_range(), "backend": backend},
                           "lmstudio": {"home": str(root / "lmstudio")}, **deployment},
            "pipeline": {"state_dir": str(root / "state"), "work_dir": str(root / "work")},
            "logging": {"log_dir": str(root / "logs")},
        }
        cfg = config_from_dict(data)
        made.append(cfg)
        return cfg

    yield make
    for cfg in made:
        stop_model_servers(cfg, MODEL)


def with_version(cfg, version):
    models = {MODEL: cfg.models[MODEL].model_copy(update={"version": version})}
    return cfg.model_copy(update={"models": models})


def chat(port, messages, *, max_tokens=4, conn=None, logprobs=False, timeout=60):
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if logprobs:
        body.update(logprobs=True, top_logprobs=1)
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, (resp.status, data[:300])
        return json.loads(data)
    finally:
        if own:
            conn.close()


def info(port):
    r = Client(f"http://127.0.0.1:{port}").get("/loradeploy/info")
    assert r.status == 200, r.data
    return r.data


def token_count(port, text, backend="llama-server"):
    """Tokens of ``text`` with the special ones the model adds (BOS), by the server's own tokenizer."""
    client = Client(f"http://127.0.0.1:{port}")
    if backend == "python":
        r = client.post("/extras/tokenize/count", {"model": MODEL, "input": text})
        assert r.status == 200, r.data
        return r.data["count"]
    r = client.post("/tokenize", {"content": text, "add_special": True})
    assert r.status == 200, r.data
    return len(r.data["tokens"])


def first_logprob(port):
    out = chat(port, [{"role": "user", "content": "echo: quartz lantern"}], max_tokens=3, logprobs=True)
    return [round(t["logprob"], 6) for t in out["choices"][0]["logprobs"]["content"]]


class Hammer(threading.Thread):
    """Keeps asking the model's port: chat on a kept-alive connection, chat on a new connection,
    a streamed chat, and which version answers; records every failure."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.seen: list[tuple[float, str]] = []  # (time, version) of each info answer

    def _stream(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "echo: red moon"}], "max_tokens": 4,
                    "temperature": 0, "stream": True}
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                         headers={"content-type": "application/json"})
            resp = conn.getresponse()
            text = resp.read().decode()
            assert resp.status == 200 and "[DONE]" in text, (resp.status, text[:200])
        finally:
            conn.close()

    def run(self):
        keep = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        i = 0
        while not self.stop.is_set():
            try:
                kind = i % 3
                if kind == 0:
                    chat(self.port, [{"role": "user", "content": "echo: apple river"}], conn=keep)
                elif kind == 1:
                    chat(self.port, [{"role": "user", "content": "echo: blue stone"}])
                else:
                    self._stream()
                self.ok += 1
                self.seen.append((time.monotonic(), info(self.port)["version"]))
            except Exception as exc:  # every failure is what this test is about
                self.failures.append(f"{time.strftime('%H:%M:%S')} request {i}: {type(exc).__name__}: {exc}")
                keep.close()
                keep = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            i += 1
        keep.close()

    def finish(self):
        self.stop.set()
        self.join(timeout=120)


def _transition_gap(seen, old, new):
    first_new = next(i for i, (_, v) in enumerate(seen) if v == new)
    return seen[first_new][0] - seen[first_new - 1][0] if seen[first_new - 1][1] == old else 0.0


def _median_gap(seen):
    gaps = sorted(b[0] - a[0] for a, b in zip(seen, seen[1:]))
    return gaps[len(gaps) // 2]


def _pids_dead(*recs):
    return all(not proc.alive(r) for r in recs)


# ----------------------------------------------------------------------------- real servers

@pytest.mark.slow
def test_deploy_switch_without_failures_and_rollback(cfg_factory, tiny_ggufs):
    v1, v2 = tiny_ggufs["v1", "Q8_0"], tiny_ggufs["v2", "Q8_0"]
    sha1, sha2 = sha256_file(v1), sha256_file(v2)
    cfg = cfg_factory()
    port = cfg.models[MODEL].port

    t0 = time.monotonic()
    res1 = deploy(cfg, MODEL, v1)
    start_s = time.monotonic() - t0
    assert res1["version"] == "v1" and res1["sha256"] == sha1 and res1["targets"]["llamacpp"]["action"] == "started"
    assert chat(port, [{"role": "user", "content": "echo: apple river"}])["choices"][0]["message"]["content"]
    assert info(port)["sha256"] == sha1
    lp1 = first_logprob(port)
    [row] = serve_status(cfg)
    assert (row["model"], row["version"], row["port"], row["state"]) == (MODEL, "v1", port, "running")
    [ep] = endpoints(cfg)
    assert (ep.version, ep.sha256, ep.base_url, ep.pid) == ("v1", sha1, f"http://127.0.0.1:{port}", row["pid"])
    old = served(cfg, MODEL).backend

    cfg2 = with_version(cfg, "v2")
    hammer = Hammer(port)
    hammer.start()
    time.sleep(1.0)
    before = hammer.ok
    t0 = time.monotonic()
    res2 = deploy(cfg2, MODEL, v2)
    switch_s = time.monotonic() - t0
    time.sleep(1.0)
    hammer.finish()
    assert hammer.failures == [], hammer.failures[:5]
    assert hammer.ok - before >= 3, "the client must have been asking during the switch"
    versions_seen = [v for _, v in hammer.seen]
    assert "v1" in versions_seen and versions_seen[-1] == "v2"
    first_v2 = versions_seen.index("v2")
    assert "v1" not in versions_seen[first_v2:], "once switched, every request reaches the new version"
    assert res2["version"] == "v2" and res2["previous"] == "v1" and res2["targets"]["llamacpp"]["action"] == "switched"
    assert info(port)["sha256"] == sha2
    assert first_logprob(port) != lp1, "v2 must answer differently from v1"
    assert _pids_dead(old), "the v1 server is stopped after the switch"
    [b] = versions.backups(cfg, MODEL)
    assert b.version == "v1" and b.sha256 == sha1 and b.path.is_file()
    assert versions.live_version(cfg, MODEL).version == "v2"

    switch_gap = _transition_gap(hammer.seen, "v1", "v2")
    hammer2 = Hammer(port)
    hammer2.start()
    time.sleep(0.5)
    res3 = rollback(cfg2, MODEL)
    time.sleep(0.5)
    hammer2.finish()
    assert hammer2.failures == [], hammer2.failures[:5]
    assert res3["version"] == "v1" and res3["sha256"] == sha1 and res3["previous"] == "v2"
    assert info(port)["sha256"] == sha1 and sha256_file(Path(info(port)["gguf"])) == sha1
    assert first_logprob(port) == lp1, "after rollback the v1 bytes answer again, token for token"
    assert served(cfg, MODEL).version == "v1"
    assert [b.version for b in versions.backups(cfg, MODEL)] == ["v2"]
    print(f"\nfirst start {start_s:.2f}s (backend ready {res1['targets']['llamacpp']['ready_s']}s); "
          f"switch deploy {switch_s:.2f}s (proxy flip {res2['targets']['llamacpp']['switch_s'] * 1000:.1f} ms); "
          f"last v1 -> first v2 answer {switch_gap * 1000:.0f} ms (median between answers "
          f"{_median_gap(hammer.seen) * 1000:.0f} ms); requests: switch {hammer.ok}, rollback {hammer2.ok}, failed 0")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama-server", "python"])
def test_system_prompt_rule(cfg_factory, tiny_ggufs, backend):
    """The proxy applies the rule for either backend (llama-server has no such option of its own)."""
    cfg = cfg_factory(backend=backend)
    port = cfg.models[MODEL].port
    deploy(cfg, MODEL, tiny_ggufs["v1", "Q8_0"])
    assert info(port)["backend"] == backend and info(port)["system_prompt"] is True
    user = {"role": "user", "content": "echo: green door"}
    own = {"role": "system", "content": "Answer briefly."}
    configured = {"role": "system", "content": SYSTEM}

    without = chat(port, [user])["usage"]["prompt_tokens"]
    kept = chat(port, [own, user])["usage"]["prompt_tokens"]
    # The server renders the GGUF's ChatML template (which adds no BOS); count each rendering as the
    # chat route tokenizes it: llama-server adds the model's BOS, llama-cpp-python does not.
    bos = token_count(port, "", backend) if backend == "python" else 0

    def count(messages):
        return token_count(port, render_chatml(messages), backend) - bos

    assert without == count([configured, user])
    assert without != count([user])
    assert kept == count([own, user])
    assert kept != count([configured, own, user])


@pytest.mark.slow
def test_bad_file_fails_probe_and_old_version_keeps_serving(cfg_factory, tiny_ggufs, tmp_path):
    cfg = cfg_factory()
    port = cfg.models[MODEL].port
    v1 = tiny_ggufs["v1", "Q8_0"]
    deploy(cfg, MODEL, v1)
    before = served(cfg, MODEL)
    bad = _without_tensor(v1, tmp_path / "broken.gguf", "output_norm.weight")

    with pytest.raises(DeployError, match="exited during startup: .*tensor 'output_norm.weight' not found"):
        deploy(with_version(cfg, "v2"), MODEL, bad)
    assert info(port)["sha256"] == sha256_file(v1)
    assert chat(port, [{"role": "user", "content": "echo: apple"}])["choices"]
    after = served(cfg, MODEL)
    assert after.backend.pid == before.backend.pid and after.version == "v1"
    assert versions.live_version(cfg, MODEL).version == "v1"
    assert not (versions.model_dir(cfg, MODEL) / "v2").exists() and versions.backups(cfg, MODEL) == []
    assert "output_norm.weight" in serving.serve_logs(cfg, MODEL, 200)


@pytest.mark.slow
def test_pipeline_deploy_stage_resumes_and_restarts_a_dead_server(cfg_factory, tiny_ggufs):
    from loradeploy.pipeline import run_pipeline
    from loradeploy.stages.base import Artifact
    from loradeploy.state import save_record

    cfg = cfg_factory()
    port = cfg.models[MODEL].port
    v1 = tiny_ggufs["v1", "Q8_0"]
    save_record(cfg.pipeline.state_dir, MODEL, {"version": 1, "model": MODEL, "stages": {"quantize": {
        "status": "done", "inputs_hash": "from-test", "artifacts": [Artifact.of(v1, "gguf", "Q8_0").to_dict()]}}})

    def deploy_status():
        res = run_pipeline(cfg, [MODEL], only=["deploy"])
        out = res.models[MODEL].stages["deploy"]
        assert res.ok, out.error
        return out

    first = deploy_status()
    assert first.status == "done" and first.info["sha256"] == sha256_file(v1)
    assert first.artifacts[0]["kind"] == "deployment"
    assert chat(port, [{"role": "user", "content": "echo: sun"}])["choices"]
    assert deploy_status().status == "skipped", "a live server serving the recorded bytes is current"

    backend = served(cfg, MODEL).backend
    os.killpg(backend.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while proc.alive(backend) and time.monotonic() < deadline:
        time.sleep(0.05)
    [row] = serve_status(cfg)
    assert row["state"] == "dead" and "server" in row["why"] and row["pid"] is None
    assert deploy_status().status == "done", "a dead server makes the deploy stage run again"
    assert serve_status(cfg)[0]["state"] == "running"
    assert chat(port, [{"role": "user", "content": "echo: moon"}])["choices"]
    assert [b.version for b in versions.backups(cfg, MODEL)] == [], "a restart of the same bytes is no new version"

    serve_stop(cfg)
    [row] = serve_status(cfg)
    assert row["state"] == "stopped" and row["pid"] is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    [started] = serve_start(cfg)
    assert started["action"] == "started" and serve_status(cfg)[0]["state"] == "running"


@pytest.mark.slow
def test_two_deploys_of_one_model_at_once(cfg_factory, tiny_ggufs, tmp_path):
    cfg = cfg_factory()
    v1 = tiny_ggufs["v1", "Q8_0"]
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json", exclude={"config_path"})))
    code = ("import json,sys; from loradeploy.config import config_from_dict; from tests.fixtures.servers import deploy; "
            "cfg=config_from_dict(json.load(open(sys.argv[1]))); print(deploy(cfg, 'tiny', sys.argv[2])['version'])")
    other = subprocess.Popen([sys.executable, "-c", code, str(cfg_file), str(v1)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = Path(cfg.pipeline.state_dir) / "locks" / f"{MODEL}.lock"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (lock.exists() and lock.read_text().startswith("deploy")):
        time.sleep(0.02)
    try:
        with pytest.raises(LockError, match=rf"model {MODEL} is busy \(deploy by pid {other.pid}\)"):
            deploy(cfg, MODEL, v1)
    finally:
        out, _ = other.communicate(timeout=180)
    assert other.returncode == 0 and out.strip().endswith("v1"), out


# ----------------------------------------------------------------------------- bad input, no server

def test_port_taken_is_a_clear_error(cfg_factory, tiny_ggufs):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = cfg_factory(port=port)
        with pytest.raises(ResourceError, match=rf"port {port} for model {MODEL} is held by pid {os.getpid()}"):
            deploy(cfg, MODEL, tiny_ggufs["v1", "Q8_0"])
    assert serving.served_model(cfg, MODEL) is None, "nothing was started"
    assert versions.live_version(cfg, MODEL) is None
    assert not (versions.model_dir(cfg, MODEL) / "v1").exists()


def test_gguf_missing_or_invalid(cfg_factory, tmp_path):
    cfg = cfg_factory()
    with pytest.raises(InputError, match="does not exist"):
        deploy(cfg, MODEL, tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(GGUFError, match="not a valid GGUF"):
        deploy(cfg, MODEL, junk)


def test_versions_backups_retention_and_named_rollback(cfg_factory, tiny_ggufs):
    v1, v2 = tiny_ggufs["v1", "Q8_0"], tiny_ggufs["v2", "Q8_0"]
    cfg = cfg_factory(targets=("ollama",), keep_backups=2)
    with pytest.raises(DeployError, match="has no deployed version to serve"):
        serve_start(cfg)
    assert deploy(cfg, MODEL, v1)["version"] == "v1"
    assert deploy(cfg, MODEL, v1)["previous"] == "v1", "the same bytes again: nothing new"
    redo = deploy(cfg, MODEL, v2)  # still configured as v1, other bytes
    assert redo["version"].startswith("v1-") and redo["previous"] == "v1"
    assert deploy(cfg, MODEL, v2)["version"] == redo["version"], "known name and bytes: same id"
    deploy(with_version(cfg, "v3"), MODEL, v1)
    deploy(with_version(cfg, "v4"), MODEL, v1)
    kept = versions.backups(cfg, MODEL)
    assert [b.version for b in kept] == ["v3", redo["version"]], "keep_backups=2 keeps the newest two"
    back = rollback(cfg, MODEL, to_version="v1")  # v1 matches the suffixed re-deploy of v1
    assert back["version"] == redo["version"] and back["sha256"] == sha256_file(v2)
    live = versions.live_version(cfg, MODEL)
    assert live.version == redo["version"] and (live.dir / "Modelfile").is_file()
    assert [b.version for b in versions.backups(cfg, MODEL)] == ["v4", "v3"]
    history = (versions.model_dir(cfg, MODEL) / "history.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["event"] == "rollback"
    # v5 carries the live bytes; rolling back to the version it replaced would change nothing.
    deploy(with_version(cfg, "v5"), MODEL, live.path)
    with pytest.raises(DeployError, match=r"already serves .* \(sha256 "):
        rollback(cfg, MODEL, to_version=live.version)


def test_rollback_without_backup(cfg_factory, tiny_ggufs):
    cfg = cfg_factory(targets=("ollama",))
    with pytest.raises(DeployError, match=rf"no backup of model {MODEL} to roll back to"):
        rollback(cfg, MODEL)
    deploy(cfg, MODEL, tiny_ggufs["v1", "Q8_0"])
    with pytest.raises(DeployError, match=r"no backup of version v7 of model tiny .*backups: none"):
        rollback(cfg, MODEL, to_version="v7")


@pytest.mark.parametrize("mode", ["symlink", "hardlink", "copy"])
def test_lmstudio_layout_and_preset(cfg_factory, tiny_ggufs, tmp_path, monkeypatch, mode):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no lms CLI: files and preset only
    cfg = cfg_factory(targets=("lmstudio",), lmstudio={"home": str(tmp_path / "lms"), "link_mode": mode})
    v1, v2 = tiny_ggufs["v1", "Q8_0"], tiny_ggufs["v2", "Q8_0"]
    res = deploy(cfg, MODEL, v1)["targets"]["lmstudio"]
    assert "open LM Studio" in res["note"]
    models = tmp_path / "lms" / "models"
    files = [p for p in models.rglob("*") if p.name.endswith(".gguf")]
    assert [p.relative_to(models).parts[:2] for p in files] == [("loradeploy", MODEL)]
    assert len(files[0].relative_to(models).parts) == 3, "exactly two folders deep"
    assert sha256_file(files[0]) == sha256_file(v1)
    assert files[0].is_symlink() == (mode == "symlink")
    if mode == "hardlink":
        assert files[0].stat().st_ino == versions.live_version(cfg, MODEL).path.stat().st_ino
    preset = json.loads((tmp_path / "lms" / "config-presets" / f"{MODEL}.preset.json").read_text())
    assert preset["identifier"] == f"@local:{MODEL}" and preset["name"] == MODEL
    fields = {f["key"]: f["value"] for f in preset["operation"]["fields"]}
    assert fields["llm.prediction.systemPrompt"] == SYSTEM

    deploy(with_version(cfg, "v2"), MODEL, v2)
    files = [p for p in models.rglob("*") if p.name.endswith(".gguf")]
    assert len(files) == 1 and sha256_file(files[0]) == sha256_file(v2), "one version listed, the new one"


def test_lmstudio_uses_lms_cli_when_present(cfg_factory, tiny_ggufs, tmp_path, monkeypatch):
    # LM Studio itself cannot run here; a stand-in `lms` records the commands we would give it.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls.txt"
    (bindir / "lms").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bindir / "lms").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    cfg = cfg_factory(targets=("lmstudio",), lmstudio={"home": str(tmp_path / "lms"), "server_port": 1299})
    res = deploy(cfg, MODEL, tiny_ggufs["v1", "Q8_0"])["targets"]["lmstudio"]
    assert res["loaded"] is True
    assert calls.read_text().splitlines() == [f"unload {MODEL}", f"load loradeploy/{MODEL} --identifier {MODEL} -y",
                                              "server start --port 1299"]


def test_lmstudio_home_not_writable(cfg_factory, tiny_ggufs, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where LM Studio's home should be")  # unwritable even for root
    cfg = cfg_factory(targets=("lmstudio",), lmstudio={"home": str(blocker / "lmstudio")})
    with pytest.raises(DeployError, match=r"LM Studio home .* is not writable"):
        deploy(cfg, MODEL, tiny_ggufs["v1", "Q8_0"])
    assert versions.live_version(cfg, MODEL) is None


def test_ollama_modelfile(cfg_factory, tiny_ggufs, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    cfg = cfg_factory(targets=("ollama",))
    res = deploy(cfg, MODEL, tiny_ggufs["v1", "Q8_0"])
    out = res["targets"]["ollama"]
    assert out["template"] == "chatml" and "ollama create tiny" in out["note"]
    text = Path(out["modelfile"]).read_text()
    live = versions.live_version(cfg, MODEL)
    assert text.splitlines()[0] == f"FROM {live.path.resolve()}"
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'PARAMETER stop "<|im_start|>"' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert f'SYSTEM """{SYSTEM}"""' in text


def _without_tensor(src: Path, dst: Path, drop: str) -> Path:
    """A structurally valid GGUF that llama.cpp cannot load (a required tensor is missing)."""
    from gguf import GGUFReader, GGUFWriter

    r = GGUFReader(str(src))
    arch = r.get_field("general.architecture").contents()
    w = GGUFWriter(str(dst), arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        if vtype.name == "ARRAY":
            w.add_key_value(f.name, f.contents(), vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), vtype)
    for t in r.tensors:
        if t.name != drop:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# ----------------------------------------------------------------------------- llama.cpp's tools

def test_llama_cpp_tools_are_found_with_an_isolated_home_and_report_their_build(tmp_path, monkeypatch):
    from loradeploy.errors import LlamaRuntimeError
    from loradeploy.llamacpp import runtime, tools

    # HOME and the cache are this test's own: the venv's link is what finds the build of `make setup`.
    for name in tools.TOOLS + tools.SCRIPTS:
        assert tools.tool(name).is_file(), name
    built = tools.info()
    assert built["llama_cpp_python"] == runtime.llama_cpp_version()
    assert built["commit"] == f"sdist-{built['sdist_sha256'][:12]}"
    assert built["commit"] in tools.reported_version("llama-server")

    monkeypatch.setattr(tools, "venv_link", lambda: tmp_path / "no-link")
    monkeypatch.delenv(tools.DIR_ENV, raising=False)
    with pytest.raises(LlamaRuntimeError, match=r"llama.cpp's tools for llama-cpp-python .* are not built.*make setup"):
        tools.tool("llama-server")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"llama_cpp_python": "0.0.1"}))
    monkeypatch.setenv(tools.DIR_ENV, str(tmp_path / "other"))
    with pytest.raises(LlamaRuntimeError, match=r"built for llama-cpp-python 0.0.1"):
        tools.tool("llama-quantize")


# ----------------------------------------------------------------------------- proxy and prompt rule, no model

def test_system_prompt_rule_on_request_bodies():
    from loradeploy.serving.policy import PortInfo, Reply, route

    def send(body, prompt="P", lora=None, path=b"/v1/chat/completions"):
        return route("POST", path, [], json.dumps(body).encode(), PortInfo(system_prompt=prompt, lora=lora))

    def rewrite(body, prompt="P"):
        return json.loads(send(body, prompt).body)["messages"]

    user = {"role": "user", "content": "hi"}
    assert rewrite({"messages": [user]}) == [{"role": "system", "content": "P"}, user]
    for own in ({"role": "system", "content": "mine"}, {"role": "developer", "content": "mine"}):
        assert rewrite({"messages": [own, user]}) == [own, user]
    assert rewrite({"messages": [user]}, prompt="") == [user], "no configured prompt: untouched"
    bad = route("POST", b"/v1/chat/completions", [], b"{not json", PortInfo(system_prompt="P"))
    assert isinstance(bad, Reply) and bad.status == 400, "bad JSON never reaches the server"
    # adapter mode: the port's lora selection replaces whatever the request asked for
    sel = [{"id": 2, "scale": 1.0}]
    out = json.loads(send({"messages": [user], "lora": [{"id": 0, "scale": 1}]}, "", sel).body)
    assert out["lora"] == sel and out["messages"] == [user]
    out = json.loads(send({"prompt": "x"}, "P", sel, b"/v1/completions").body)
    assert out == {"prompt": "x", "lora": sel}, "a completion gets the selection, and no chat messages"


def test_proxy_forwards_http_faithfully_and_switches_between_requests(tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    def backend(name):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, payload: bytes):
                self.send_response(200)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def do_HEAD(self):
                self._reply(b"0123456789")

            def do_GET(self):
                if self.path == "/metrics":
                    self.send_response(200)
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    for i in range(3):
                        data = f"data: {name} {i}\n\n".encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    return
                self._reply(json.dumps({"name": name, "path": self.path}).encode())

            def do_POST(self):
                if self.headers.get("transfer-encoding") == "chunked":
                    body = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                else:
                    body = self.rfile.read(int(self.headers["content-length"]))
                self._reply(json.dumps({"name": name, "body": body.decode()}).encode())

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv

    from loradeploy.serving.control import Control, ProxyConf, save_control, save_proxy_conf

    a, b = backend("A"), backend("B")
    control = tmp_path / "control.json"
    save_control(Control(a.server_address[1], "A", "Q8_0", "", ""), control)
    port = free_port()
    save_proxy_conf(ProxyConf("x", "127.0.0.1", port, str(control)), tmp_path / "proxy.json")
    rec = launch.spawn_worker("proxy", tmp_path / "proxy.json", tmp_path / "proxy.log")
    cfg = SimpleNamespace(deployment=SimpleNamespace(llamacpp=SimpleNamespace(api_key=None)))

    def wait_backend(backend_port):
        end = time.monotonic() + 15
        while (proxying.proxy_state(cfg, "127.0.0.1", port, 1) or {}).get("backend_port") != backend_port:
            assert time.monotonic() < end and proc.alive(rec), (tmp_path / "proxy.log").read_text()[-2000:]
            time.sleep(0.02)

    try:
        wait_backend(a.server_address[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        def ask(method, path, body=None, **kw):
            conn.request(method, path, body=body, **kw)
            resp = conn.getresponse()
            return resp, resp.read()

        big = {"prompt": "x" * 100_000, "stream": True}
        resp, data = ask("POST", "/v1/completions", body=json.dumps(big))
        assert json.loads(json.loads(data)["body"]) == big and json.loads(data)["name"] == "A"
        resp, data = ask("POST", "/v1/completions", body=iter([b'{"stream": true, "prompt": ', b'"chunk"}']),
                         encode_chunked=True)
        assert json.loads(json.loads(data)["body"]) == {"stream": True, "prompt": "chunk"}
        resp, data = ask("GET", "/metrics")  # the port's own, never the backend's
        assert resp.getheader("content-type").startswith("text/plain") and b"loradeploy_requests_total" in data
        resp, data = ask("HEAD", "/v1/models")  # only the stated methods of the stated routes
        assert resp.status == 405 and resp.getheader("allow") == "GET"
        resp, data = ask("POST", "/p", body=b"x")
        assert resp.status == 404 and json.loads(data)["error"]["type"] == "invalid_request_error"
        resp, data = ask("GET", "/health?x=1")
        assert json.loads(data) == {"name": "A", "path": "/health"}, "the query is not forwarded"

        user = {"role": "user", "content": "hi"}
        resp, data = ask("POST", "/v1/chat/completions", body=json.dumps({"messages": [user]}))
        assert json.loads(json.loads(data)["body"])["messages"] == [user], "no configured prompt: untouched"

        save_control(Control(b.server_address[1], "B", "Q8_0", "abc", "/m/B.gguf", system_prompt="Be B."), control)
        os.kill(rec["pid"], signal.SIGHUP)
        wait_backend(b.server_address[1])
        resp, data = ask("GET", "/health")  # the same kept-alive client connection
        assert json.loads(data) == {"name": "B", "path": "/health"}
        assert resp.getheader("connection") == "keep-alive"
        # The proxy answers what it serves itself, and applies the system prompt to chat bodies,
        # chunked ones included, whatever the backend is.
        resp, data = ask("GET", "/loradeploy/info")
        got = json.loads(data)
        assert (got["version"], got["sha256"], got["gguf"], got["backend"], got["system_prompt"]) == \
            ("B", "abc", "/m/B.gguf", "llama-server", True)
        chunks = [json.dumps({"messages": [user]}).encode()[:7], json.dumps({"messages": [user]}).encode()[7:]]
        resp, data = ask("POST", "/v1/chat/completions", body=iter(chunks), encode_chunked=True)
        assert json.loads(json.loads(data)["body"])["messages"] == [{"role": "system", "content": "Be B."}, user]
        resp, data = ask("POST", "/v1/completions", body=json.dumps({"prompt": "x"}))
        sent = json.loads(json.loads(data)["body"])  # a llama-server backend is asked for a stream (cancellable)
        assert sent == {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}, \
            "only chat bodies get the system prompt"

        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # curl-style Expect
            s.sendall(b"POST /tokenize HTTP/1.1\r\nhost: x\r\ncontent-length: 7\r\n"
                      b"expect: 100-continue\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
            s.sendall(b'{"a":1}')
            reply = b""
            while b'}"}' not in reply:
                reply += s.recv(4096)
            assert b'{"name": "B", "body": "{\\"a\\": 1}"}' in reply
        for framing in (b"content-length: 10000000000\r\n\r\n{}",  # answered before the body is read
                        b"transfer-encoding: chunked\r\n\r\n800000\r\n" + b" " * 0x800000 + b"\r\n1\r\n "):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + framing)
                reply = b""
                while chunk := s.recv(65536):  # the proxy closes after its answer
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 413 ") and b"connection: close" in reply, reply[:300]
        conn.close()
    finally:
        proc.stop(rec, grace=5)
        a.shutdown()
        b.shutdown()


@pytest.mark.slow
def test_api_key_guards_every_route_of_the_port_streaming_included(cfg_factory, tiny_ggufs, tmp_path):
    from pydantic import SecretStr

    from loradeploy.errors import HttpStatusError

    key = "k3y-only-in-the-environment"
    base = cfg_factory()
    lc = base.deployment.llamacpp.model_copy(update={"api_key": SecretStr(key)})
    cfg = base.model_copy(update={"deployment": base.deployment.model_copy(update={"llamacpp": lc})})
    deploy(cfg, MODEL, tiny_ggufs["v1", "Q8_0"])
    url = f"http://127.0.0.1:{cfg.models[MODEL].port}"
    for path in ("/v1/models", "/loradeploy/info", "/loradeploy/proxy", "/health"):
        assert Client(url).get(path).status == 401, path
        assert Client(url, api_key="wrong").get(path).status == 401, path
        assert Client(url, api_key=key).get(path, headers={}).status != 401, path
    body = {"model": MODEL, "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": "a b"}]}
    refused = Client(url, api_key="wrong").chat(body)
    assert refused.status == 401 and refused.data["error"]["code"] == "invalid_api_key"
    assert Client(url, api_key=key).chat(body).status == 200
    with pytest.raises(HttpStatusError) as err:
        Client(url).stream_chat(body)
    assert err.value.status == 401
    with Client(url, api_key=key).stream_chat(body) as stream:
        events = list(stream)
        assert stream.done and any(ch.get("delta") for e in events for ch in e.get("choices", []))
    # our own status checks go through the guarded port with the key
    [row] = [r for r in serve_status(cfg) if r["model"] == MODEL]
    assert row["state"] == "running", row
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert not leaked, f"the api key reached {leaked}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama-server", "python"])
def test_a_server_that_crashes_later_is_reported_with_its_signal_and_log(cfg_factory, tiny_ggufs, backend):
    import psutil

    cfg = cfg_factory(backend=backend)
    deploy(cfg, MODEL, tiny_ggufs["v1", "Q8_0"])
    supervisor = served(cfg, MODEL).backend
    [server] = psutil.Process(supervisor.pid).children()  # the supervisor's one child: the llama.cpp server
    assert ("llama-server" in server.name()) == (backend == "llama-server"), server.cmdline()
    os.kill(server.pid, signal.SIGSEGV)
    deadline = time.monotonic() + 30
    while proc.alive(supervisor) and time.monotonic() < deadline:
        time.sleep(0.1)
    [row] = [r for r in serve_status(cfg) if r["model"] == MODEL]
    assert row["state"] == "dead"
    assert "server killed by SIGSEGV in CPU mode" in row["why"] and "last log lines:" in row["why"], row["why"]


@pytest.mark.slow
def test_llama_server_decodes_overlapping_requests_together(cfg_factory, tiny_ggufs, tmp_path):
    """Four overlapping requests share llama-server's decode calls (its slots) instead of queueing:
    /metrics' average of busy slots per llama_decode() call exceeds 1 only when sequences were batched."""
    from loradeploy.health.api import prometheus_values, server_checks

    cfg = cfg_factory()
    assert cfg.deployment.llamacpp.backend == "llama-server" and cfg.deployment.llamacpp.parallel == 4
    started = launch.start_backend(cfg, MODEL, tiny_ggufs["v1", "Q8_0"], log_path=tmp_path / "server.log",
                                   conf_dir=tmp_path)
    try:
        client = Client(started.url, api_key=started.key, timeout=120)
        go = threading.Barrier(4)
        answers = []

        def ask(i):
            go.wait()
            # ignore_eos: the tiny model would stop after a few words; long answers make the requests overlap
            answers.append(client.chat({"model": MODEL, "max_tokens": 120, "temperature": 0, "ignore_eos": True,
                                        "messages": [{"role": "user", "content": f"echo: word {i}"}]}))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [a.status for a in answers] == [200] * 4, [a.data for a in answers]
        assert all(a.data["usage"]["completion_tokens"] == 120 for a in answers)
        metrics = prometheus_values(client.get("/metrics").data)
        assert metrics["n_busy_slots_per_decode"] > 1.5, metrics
        assert metrics["tokens_predicted_total"] >= 480, metrics
        ep = SimpleNamespace(model=MODEL, port=started.record["port"])
        [check] = server_checks(client, ep, cfg.health_check)
        assert check.status == "pass" and check.metrics["health"] == "ok", check
        assert check.metrics["n_busy_slots_per_decode"] == metrics["n_busy_slots_per_decode"]
    finally:
        proc.stop(started.record, grace=10)


@pytest.mark.slow
def test_default_mode_that_kills_a_real_server_is_demoted_to_safe(cfg_factory, tiny_ggufs, tmp_path, monkeypatch):
    """A verdict of "default" (as a probe on a machine whose default mode works would give): on a CPU
    where the default mode really kills llama.cpp the launcher retries in safe mode and remembers;
    where it works, the server simply runs in default mode."""
    from loradeploy.llamacpp import runtime

    cache = tmp_path / "cpu-cache"
    monkeypatch.setenv(runtime.CACHE_ENV, str(cache))
    fp = runtime.fingerprint()
    cache.mkdir()
    (cache / f"llamacpp-cpu-mode-{runtime._key(fp)}.json").write_text(json.dumps(
        {"mode": "default", "why": "default mode generated 4 tokens", "decided_at": time.time(), "attempts": [],
         "fingerprint": fp}))
    cfg = cfg_factory()
    info = deploy(cfg, MODEL, tiny_ggufs["v1", "Q8_0"])
    assert chat(cfg.models[MODEL].port, [{"role": "user", "content": "a b"}])["choices"]
    mode = served(cfg, MODEL).backend.cpu_mode.as_dict()
    log = serving.serve_logs(cfg, MODEL, 400)
    if mode["mode"] == "safe":
        assert "passed the probe, but a server of" in mode["why"] and "killed by SIG" in mode["why"]
        runtime._DECIDED.clear()
        assert runtime.decide().name == "safe", "the demotion is remembered for this machine"
    else:
        assert "killed by" not in log
    assert info["targets"]["llamacpp"]["cpu_mode"].startswith(mode["mode"])
