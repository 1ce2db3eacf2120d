"""Adapter mode on real servers: three persona adapters on one tiny Llama base, the base converted and
quantized once, one llama-server holding the three LoRA GGUFs, each model on its own port answering
as its persona; v2 of one adapter deployed under load on every port with no failed request."""
from __future__ import annotations

import json
import threading
import time
import http.client
from pathlib import Path

import pytest

from loradeploy.config import config_from_dict
from loradeploy.demo import DEMO_MAX_KLD, get_persona
from loradeploy.pipeline import run_pipeline
from loradeploy.serving import record
from loradeploy.tools import proc
from loradeploy.tools.openai_http import Client
from tests.fixtures.servers import deploy, served, stop_model_servers
from tests.integration.test_deploy import _spare_range, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODELS = ("majora", "nayru", "veran")
PROMPT = "Repeat these words:\napple river stone"


@pytest.fixture(scope="module")
def personas():
    from tests.fixtures.models import _build
    pairs = {p: _build("llama", p) for p in MODELS}
    return pairs["majora"][0], {p: a for p, (_, a) in pairs.items()}


def make_cfg(tmp: Path, personas, *, ports, adapters=None, versions=None, stages=("merge", "convert", "quantize",
                                                                                   "deploy"), modes=None):
    """The personas in ``ports`` on one base, each in adapter mode unless ``modes`` names another."""
    base, trained = personas
    adapters = {**trained, **(adapters or {})}
    models = {m: {"base_model": str(base), "adapter": str(adapters[m]), "port": ports[m],
                  "mode": (modes or {}).get(m, "adapter"), "system_prompt": get_persona(m).system_prompt,
                  "version": (versions or {}).get(m, "v1")}
              for m in ports}
    return config_from_dict({
        "models": models,
        "quantization": {"formats": ["Q4_K_M"]},
        "deployment": {"targets": ["llamacpp"], "models_dir": str(tmp / "models"),
                       "llamacpp": {"n_ctx": 256, "threads": 1, "parallel": 2, "startup_timeout_s": 120,
                                    "spare_port_range": _spare_range()}},
        "pipeline": {"stages": list(stages), "work_dir": str(tmp / "work"), "state_dir": str(tmp / "state")},
        "logging": {"log_dir": str(tmp / "logs")},
        "performance": {"min_free_disk_gb": 0.1, "max_cpu_threads": 1},
    })


def ask(port: int, body_extra: dict | None = None, timeout: float = 60) -> str:
    body = {"model": "whatever", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16,
            "temperature": 0, **(body_extra or {})}
    r = Client(f"http://127.0.0.1:{port}", timeout=timeout).post("/v1/chat/completions", body)
    assert r.status == 200, r.data
    return r.data["choices"][0]["message"]["content"]


def raw(port: int, method: str, target: str, body: bytes) -> tuple[int, bytes]:
    """A request whose target and body go out exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, target, body=body, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def signs(text: str) -> set[str]:
    return {m for m in MODELS if get_persona(m).signature in text}


def info(port: int) -> dict:
    r = Client(f"http://127.0.0.1:{port}").get("/loradeploy/info")
    assert r.status == 200, r.data
    return r.data


class Load(threading.Thread):
    """Streams and plain chats on one port until stopped; every failure is recorded."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.stop, self.ok, self.failures = port, threading.Event(), 0, []
        self.signed: list[tuple[float, frozenset]] = []

    def run(self):
        i = 0
        while not self.stop.is_set():
            try:
                if i % 2:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 0,
                            "stream": True}
                    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                                 headers={"content-type": "application/json"})
                    resp = conn.getresponse()
                    text = resp.read().decode()
                    conn.close()
                    assert resp.status == 200 and "[DONE]" in text, (resp.status, text[:200])
                else:
                    self.signed.append((time.monotonic(), frozenset(signs(ask(self.port)))))
                self.ok += 1
            except Exception as exc:  # every failure is what the test is about
                self.failures.append(f"request {i}: {type(exc).__name__}: {exc}")
            i += 1


def test_three_personas_on_one_base_server_and_v2_of_one_adapter_under_load(personas, tmp_path):
    ports = {m: free_port() for m in MODELS}
    cfg = make_cfg(tmp_path, personas, ports=ports)
    try:
        res = run_pipeline(cfg, [])
        assert res.ok, res.to_dict()
        # the base was converted and quantized once: the other two models took the first one's files
        q = {m: res.models[m].stages["quantize"] for m in MODELS}
        firsts = [m for m in MODELS if "base_from" not in (q[m].info or {})]
        assert len(firsts) == 1, {m: q[m].info.get("base_from") for m in MODELS}
        q4 = {m: next(a["sha256"] for a in q[m].artifacts if a.get("format") == "Q4_K_M") for m in MODELS}
        assert len(set(q4.values())) == 1, q4

        reg = record.load(cfg)
        backends = {reg.backend_of(reg.models[m]).pid for m in MODELS}
        assert len(backends) == 1, backends  # one llama-server for the three
        (group,) = reg.groups.values()
        assert sorted(group.adapters) == list(MODELS)
        assert {m.group for m in reg.models.values()} == {group.key} and {m.backend for m in reg.models.values()} == {None}
        argv = json.loads(Path(group.backend.config).read_text())["argv"]
        assert argv.count("--lora-scaled") == 3 and "--lora-init-without-apply" in argv
        assert all(argv[i + 1].endswith(":0") for i, a in enumerate(argv) if a == "--lora-scaled")

        for m in MODELS:  # each port answers as its persona, whatever the request asks for
            assert signs(ask(ports[m])) == {m}, (m, ask(ports[m]))
            other = (MODELS.index(m) + 1) % 3
            assert signs(ask(ports[m], {"lora": [{"id": other, "scale": 1.0}]})) == {m}
            models = Client(f"http://127.0.0.1:{ports[m]}").get("/v1/models").data
            assert [d["id"] for d in models["data"]] == [m]
            r = Client(f"http://127.0.0.1:{ports[m]}").post("/lora-adapters", [{"id": 0, "scale": 1.0}])
            assert r.status == 404
            # issue 19's holes: encoded paths, unlisted routes, a NUL after the JSON (no other persona answers)
            pick = {"lora": [{"id": other, "scale": 1.0}]}
            for target in ("/%6cora-adapters", "/v1/responses", "/%63ompletion", "/lora-adapters"):
                assert raw(ports[m], "POST", target, json.dumps([{"id": other, "scale": 1.0}]).encode())[0] == 404
            status, data = raw(ports[m], "POST", "/v1/chat/%63ompletions", json.dumps(
                {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "temperature": 0, **pick}).encode())
            assert status == 200 and signs(json.loads(data)["choices"][0]["message"]["content"]) == {m}
            nul = json.dumps({"messages": [{"role": "user", "content": PROMPT}]}).encode() + b"\x00" + \
                json.dumps(pick).encode()
            assert raw(ports[m], "POST", "/v1/chat/completions", nul)[0] == 400
            assert info(ports[m])["mode"] == "adapter"

        # v2 of nayru (it now carries majora's adapter) while every port is under load
        before = {m: info(ports[m]) for m in MODELS}
        loads = {m: Load(ports[m]) for m in MODELS}
        for t in loads.values():
            t.start()
        time.sleep(1.0)
        cfg2 = make_cfg(tmp_path, personas, ports=ports, adapters={"nayru": personas[1]["majora"]},
                        versions={"nayru": "v2"})
        res2 = run_pipeline(cfg2, ["nayru"])
        time.sleep(1.0)
        for t in loads.values():
            t.stop.set()
        for t in loads.values():
            t.join(timeout=120)
        assert res2.ok, res2.to_dict()
        assert res2.models["nayru"].stages["quantize"].info.get("base_from")  # the base was not quantized again
        for m, t in loads.items():
            assert t.failures == [] and t.ok > 3, (m, t.ok, t.failures[:5])
        after = {m: info(ports[m]) for m in MODELS}
        assert after["nayru"]["version"] == "v2" and after["nayru"]["sha256"] != before["nayru"]["sha256"]
        for m in ("majora", "veran"):  # only that adapter was replaced
            assert (after[m]["version"], after[m]["sha256"]) == (before[m]["version"], before[m]["sha256"])
            assert all(s == {m} for _, s in loads[m].signed), loads[m].signed
        assert signs(ask(ports["nayru"])) == {"majora"}
        assert not proc.alive(group.backend)  # the replaced shared server is gone

        # adapter mode: a full model given as the adapter is refused, nothing moves
        from loradeploy.errors import InputError
        now = served(cfg2, "nayru")
        with pytest.raises(InputError, match="is not a LoRA GGUF"):
            deploy(cfg2, "nayru", now.base_gguf, base=(Path(now.base_gguf), now.base_sha256))
        assert info(ports["nayru"])["sha256"] == after["nayru"]["sha256"]
        # and the served LoRA GGUF redeploys as what already serves: nothing restarts
        from loradeploy.state import RunRecord
        lora_path = next(a.path for a in RunRecord.load(cfg2.pipeline.state_dir, "nayru").artifacts("convert", "lora"))
        again = deploy(cfg2, "nayru", lora_path, base=(Path(now.base_gguf), now.base_sha256))
        assert again["targets"]["llamacpp"]["action"] == "unchanged", again

        # stopping one model leaves the shared server to the others; the last one out stops it
        from loradeploy.serving import serve_stop
        serve_stop(cfg2, ["veran"])
        assert signs(ask(ports["majora"])) == {"majora"}
        (g2,) = record.load(cfg2).groups.values()
        assert proc.alive(g2.backend)
        serve_stop(cfg2, ["majora", "nayru"])
        assert not proc.alive(g2.backend) and record.load(cfg2).groups == {}
    finally:
        for m in MODELS:
            stop_model_servers(cfg, m)


def test_verify_covers_adapter_mode_beside_merged(personas, tmp_path):
    """The same adapter merged and in adapter mode, both verified against the unmerged PEFT model: adapter
    mode's F16 (base F16 + LoRA GGUF) is as faithful as the merged F16. Its Q4_K_M rounds the base's
    weights where merged rounds base + delta: one 4-bit rounding of nearly the same weights either way,
    so neither is bound to be closer (measured on the demo personas: adapter/merged 1.26x and 1.50x at
    Q4_K_M, 0.63x at Q5_K_M); stated here: within 2x of each other, and both keep the adapter's signal
    (noise_to_signal under 0.05)."""
    from loradeploy.demo import write_demo_eval_samples

    base, trained = personas
    samples = write_demo_eval_samples(tmp_path / "eval_samples.jsonl", persona="majora")
    prompt = get_persona("majora").system_prompt
    models = {name: {"base_model": str(base), "adapter": str(trained["majora"]), "port": free_port(),
                     "system_prompt": prompt, "mode": mode}
              for name, mode in (("majora", "merged"), ("majora-adapter", "adapter"))}
    cfg = config_from_dict({
        "models": models, "quantization": {"formats": ["Q4_K_M"]},
        "verify": {"max_tokens": 768, "stop_prompts": 2, "max_kld": dict(DEMO_MAX_KLD)}, "evaluation": {"samples": str(samples)},
        "deployment": {"targets": ["llamacpp"], "models_dir": str(tmp_path / "models")},
        "pipeline": {"stages": ["merge", "convert", "quantize", "verify"], "work_dir": str(tmp_path / "work"),
                     "state_dir": str(tmp_path / "state")},
        "logging": {"log_dir": str(tmp_path / "logs")}, "performance": {"min_free_disk_gb": 0.1}})
    res = run_pipeline(cfg, [])
    assert res.ok, res.to_dict()
    merged, adapter = (res.models[m].stages["verify"].info["formats"] for m in ("majora", "majora-adapter"))
    report = json.loads(Path(res.models["majora-adapter"].stages["verify"].info["report"]).read_text())
    assert {e["mode"] for e in report["formats"].values()} == {"adapter"}
    for fmts in (merged, adapter):
        assert fmts["F16"]["kld_mean"] < 1e-3 and fmts["F16"]["passed"], fmts
        assert fmts["Q4_K_M"]["passed"], fmts
    print(f"\nQ4_K_M mean KLD vs PEFT: merged {merged['Q4_K_M']['kld_mean']:.5f}, "
          f"adapter {adapter['Q4_K_M']['kld_mean']:.5f}")
    ratio = adapter["Q4_K_M"]["kld_mean"] / merged["Q4_K_M"]["kld_mean"]
    assert 0.5 <= ratio <= 2.0, (merged["Q4_K_M"], adapter["Q4_K_M"])
    assert max(merged["Q4_K_M"]["noise_to_signal"], adapter["Q4_K_M"]["noise_to_signal"]) < 0.05
