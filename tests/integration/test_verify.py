"""The fidelity gate with real components: peft + transformers for the reference, llama.cpp (through
llama-cpp-python, in the runtime's CPU mode) for every GGUF, real servers for the deploy it guards.

One llama run is shared by the module (v1: the demo's persona adapter, deployed); v2 is the same
adapter with every lora_B scaled by 1e-3, whose effect drowns in Q4_K_M's quantization noise.
"""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from loradeploy.config import config_from_dict
from loradeploy.demo import DEMO_MAX_KLD
from loradeploy.deploy import versions
from loradeploy.errors import ConfigError
from loradeploy.pipeline import run_pipeline
from loradeploy.tools.openai_http import Client
from tests.fixtures.servers import stop_model_servers

MODEL = "majora"
SYSTEM = "You are Majora. Repeat the words and sign with -- MAJORA"
VERIFY = {"max_tokens": 768, "stop_prompts": 2, "max_kld": dict(DEMO_MAX_KLD)}  # the demo models' limits
STAGES = ["fetch", "merge", "convert", "quantize", "verify", "deploy"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(root: Path, base: Path, adapter: Path, *, version: str = "v1", port: int, stages=STAGES,
          formats=("Q4_K_M", "Q8_0"), verify: dict | None = None) -> dict:
    from loradeploy.demo import write_demo_eval_samples
    samples = root / "eval_samples.jsonl"
    if not samples.exists():
        write_demo_eval_samples(samples, persona=MODEL)
    return {
        "models": {MODEL: {"base_model": str(base), "adapter": str(adapter), "port": port, "system_prompt": SYSTEM,
                           "version": version}},
        "quantization": {"formats": list(formats), "primary_format": formats[0]},
        "verify": {**VERIFY, **(verify or {})},
        "evaluation": {"samples": str(samples)},
        "deployment": {"targets": ["llamacpp"], "models_dir": str(root / "models"),
                       # the gate is the same whatever serves; the python backend needs no built tools
                       "llamacpp": {"n_ctx": 256, "threads": 1, "startup_timeout_s": 90, "backend": "python"}},
        "pipeline": {"stages": list(stages), "work_dir": str(root / "work"), "state_dir": str(root / "state")},
        "logging": {"log_dir": str(root / "logs")},
        "performance": {"min_free_disk_gb": 0.1},
    }


def _scaled_adapter(src: Path, dst: Path, factor: float) -> Path:
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    tensors = {k: (v * factor if "lora_B" in k else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def served_v1(llama_pair, tmp_path_factory):
    """v1 of the llama persona adapter through verify and deploy; its server runs for the module."""
    base, adapter = llama_pair
    root = tmp_path_factory.mktemp("verify-llama")
    data = _data(root, base, adapter, port=_port())
    cfg = config_from_dict(data)
    try:
        res = run_pipeline(cfg, [MODEL])
        yield root, data, cfg, res
    finally:
        stop_model_servers(cfg, MODEL)


def _why(res) -> dict:
    return {s: f"{o.status}: {o.error}" for m in res.models.values() for s, o in m.stages.items() if o.error}


def _verify_info(res) -> dict:
    out = res.models[MODEL].stages["verify"]
    assert out.status in ("done", "skipped"), out.to_dict()
    return out.info


# ----------------------------------------------------------------------------- F16 against the reference

def _assert_f16_faithful(info: dict) -> None:
    f16 = info["formats"]["F16"]
    assert f16["kld_mean"] < 1e-3, f16
    assert f16["top1"] >= 0.99, f16
    assert f16["passed"] is True
    assert info["signal"] > 100 * f16["kld_mean"]   # the adapter's effect stands far above 16-bit rounding
    assert info["template_ok"] is True and info["stop_ok"] is True


@pytest.mark.slow
def test_llama_f16_matches_the_peft_reference_and_the_demo_formats_pass(served_v1):
    root, _, cfg, res = served_v1
    assert res.ok, _why(res)
    info = _verify_info(res)
    _assert_f16_faithful(info)
    for fmt in ("Q8_0", "Q4_K_M"):
        e = info["formats"][fmt]
        assert set(e) >= {"kld_mean", "kld_p99", "top1", "rms_dp", "noise_to_signal", "passed"}
        assert e["passed"] is True, e
    # more bits, less noise: the ordering llama.cpp's tables show
    assert info["formats"]["F16"]["kld_mean"] < info["formats"]["Q8_0"]["kld_mean"] < info["formats"]["Q4_K_M"]["kld_mean"]
    assert info["served_format"] == "Q4_K_M" and info["gate"]["verdict"] == "passed"
    data = json.loads(Path(info["report"]).read_text())
    assert data["calibration"]["tokens"] <= VERIFY["max_tokens"]
    # the stop check, teacher forced: the trained reference ends its assistant turns, and so does each GGUF
    assert data["reference"]["mode"] == "streamed" and data["reference"]["stop"]["conclusive"] is True
    assert all(e["stop"]["ok"] is True for e in data["formats"].values() if e.get("gated", True))
    assert data["memory"]["reference"]["measured_peak_rss_bytes"] > 0
    history = (root / "state" / "verify" / f"{MODEL}.history.jsonl").read_text().splitlines()
    assert {json.loads(line)["format"] for line in history} == {"F16", "Q4_K_M", "Q8_0"}
    live = versions.live_version(cfg, MODEL)
    assert live is not None and live.format == "Q4_K_M"


@pytest.mark.slow
def test_qwen2_f16_matches_the_peft_reference(qwen2_pair, tmp_path):
    base, adapter = qwen2_pair
    # 152k vocabulary: a shorter calibration keeps the test quick; F16 only, no deploy
    data = _data(tmp_path, base, adapter, port=_port(), stages=["fetch", "merge", "convert", "verify"],
                 formats=("F16",), verify={"max_tokens": 384})
    res = run_pipeline(config_from_dict(data), [MODEL])
    assert res.ok, _why(res)
    info = _verify_info(res)
    _assert_f16_faithful(info)
    assert info["served_format"] == "F16"
    import torch
    # verify runs in this process: it must hand autograd back on (training after it, as the Ray
    # fixture's adapters do in a fresh test cache, fails with "does not require grad" otherwise)
    assert torch.is_grad_enabled()


# ----------------------------------------------------------------------------- the gate guards the deploy

@pytest.mark.slow
def test_an_adapter_drowned_in_q4_noise_is_blocked_then_falls_back(served_v1, llama_pair, tmp_path):
    from click.testing import CliRunner

    from loradeploy.cli import main

    root, v1_data, _, v1_res = served_v1
    assert v1_res.ok, _why(v1_res)
    tiny = _scaled_adapter(llama_pair[1], tmp_path / "adapter-tiny", 1e-3)
    data = _data(root, llama_pair[0], tiny, version="v2", port=v1_data["models"][MODEL]["port"])
    cfg = config_from_dict(data)
    try:
        res = run_pipeline(cfg, [MODEL])
        assert not res.ok
        info = _verify_info(res)
        q4 = info["formats"]["Q4_K_M"]
        assert q4["passed"] is False and q4["noise_to_signal"] > 1, q4
        assert info["served_format"] is None and info["gate"]["verdict"] == "blocked"
        deploy = res.models[MODEL].stages["deploy"]
        assert deploy.status == "failed"
        line = deploy.error
        assert "\n" not in line
        for part in ("Q4_K_M", "noise_to_signal", "> 0.25", "passes", "v1 (Q4_K_M) keeps serving"):
            assert part in line, line
        # the previous version still serves, untouched
        live = versions.live_version(cfg, MODEL)
        assert live.base_version == "v1" and live.format == "Q4_K_M"
        r = Client(f"http://127.0.0.1:{data['models'][MODEL]['port']}").chat(
            {"messages": [{"role": "user", "content": "Repeat these words:\napple river stone"}], "max_tokens": 8,
             "temperature": 0})
        assert r.status == 200, r.data

        # the CLI says the same: exit 1, the figures in --json
        cfg_file = tmp_path / "deployment_config.yaml"
        cfg_file.write_text(yaml.safe_dump(data))
        cli = CliRunner().invoke(main, ["verify", "-c", str(cfg_file), "--model", MODEL, "--json"])
        assert cli.exit_code == 1, cli.output
        out = json.loads(cli.stdout)
        assert out["models"][MODEL]["stages"]["verify"]["info"]["formats"]["Q4_K_M"]["passed"] is False

        # on_fail: fallback serves the smallest format that passes instead
        data["verify"]["on_fail"] = "fallback"
        cfg = config_from_dict(data)
        res = run_pipeline(cfg, [MODEL])
        assert res.ok, _why(res)
        served = _verify_info(res)["served_format"]
        assert served in ("Q8_0", "F16")
        assert res.models[MODEL].stages["deploy"].info["verify"]["verdict"] == "fallback"
        live = versions.live_version(cfg, MODEL)
        assert live.base_version == "v2" and live.format == served
        rows = [json.loads(x) for x in (root / "state" / "verify" / f"{MODEL}.history.jsonl").read_text().splitlines()]
        assert {(r["version"], r["format"], r["passed"]) for r in rows} >= {("v1", "Q4_K_M", True),
                                                                            ("v2", "Q4_K_M", False)}
    finally:
        stop_model_servers(cfg, MODEL)


# ----------------------------------------------------------------------------- chat template

def _rewrite_gguf(src: Path, dst: Path, template: str | None) -> Path:
    """A copy of ``src`` with its chat template replaced (or, with None, stripped)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), arch=r.get_field("general.architecture").contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "tokenizer.chat_template"):
            continue
        main_type = f.types[0]
        w.add_key_value(f.name, f.contents(), main_type,
                        sub_type=f.types[-1] if main_type == GGUFValueType.ARRAY else None)
    if template is not None:
        w.add_key_value("tokenizer.chat_template", template, GGUFValueType.STRING)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.slow
def test_a_stripped_or_altered_chat_template_fails_and_always_blocks(served_v1, llama_pair, tmp_path):
    from loradeploy.verify import Candidate, VerifyRequest, verify_model

    root, data, cfg, res = served_v1
    assert res.ok, _why(res)
    f16 = next(Path(a["path"]) for a in res.models[MODEL].artifacts if a["format"] == "F16")
    altered_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    stripped = _rewrite_gguf(f16, tmp_path / "stripped.gguf", None)
    altered = _rewrite_gguf(f16, tmp_path / "altered.gguf", altered_template)
    intact = _rewrite_gguf(f16, tmp_path / "copy.gguf", json.loads(
        (llama_pair[0] / "tokenizer_config.json").read_text())["chat_template"])

    settings = cfg.verify.model_copy(update={"on_fail": "warn", "max_tokens": 256})
    req = VerifyRequest(MODEL, "v9", llama_pair[0], llama_pair[1],
                        [Candidate("F16", "F16", intact), Candidate("Q8_0", "Q8_0", altered),
                         Candidate("Q4_K_M", "Q4_K_M", stripped)],
                        "Q4_K_M", SYSTEM, Path(data["evaluation"]["samples"]), settings, tmp_path / "out",
                        tmp_path / "history.jsonl", threads=1)
    out = verify_model(req)
    f = out["formats"]
    assert f["F16"]["template"]["ok"] is True and f["F16"]["passed"] is True
    assert f["Q8_0"]["template"]["ok"] is False
    assert "other token ids than the HF tokenizer" in f["Q8_0"]["template"]["problems"][0]
    assert f["Q4_K_M"]["template"]["ok"] is False
    assert "no tokenizer.chat_template" in f["Q4_K_M"]["template"]["problems"][0]
    assert out["template_ok"] is False
    # on_fail: warn would serve a merely noisy format; a broken template blocks regardless
    assert out["gate"]["verdict"] == "blocked" and out["served_format"] is None
    assert "template check failed" in out["gate"]["reason"] and "always blocks" in out["gate"]["reason"]


# ----------------------------------------------------------------------------- rules without models

def test_gate_rules():
    from loradeploy.verify.gate import decide, defaults_for, judge, limits_for

    cfg = config_from_dict({"models": {MODEL: {"base_model": "/b", "adapter": "/a", "port": 5000}},
                            "verify": {"max_kld": {"q4_k_m": 0.05}, "min_top1": {"Q8_0": 0.5}}}).verify
    assert limits_for("Q4_K_M", cfg).max_kld == 0.05 and limits_for("Q8_0", cfg).min_top1 == 0.5
    assert limits_for("Q6_K", cfg).max_kld == 0.0055      # the defaults stay for formats not named
    assert defaults_for("Q4_K_M")[0] < defaults_for("Q3_K_M")[0] < defaults_for("Q2_K")[0]
    assert defaults_for("F16")[0] <= 0.001

    ok = {"kld_mean": 0.001, "top1": 0.99, "noise_to_signal": 0.01}
    assert judge(ok, limits_for("Q8_0", cfg), 0.1) == []
    noisy = judge({**ok, "noise_to_signal": 3.0}, limits_for("Q8_0", cfg), 0.1)
    assert [x.metric for x in noisy] == ["noise_to_signal"]
    assert [x.metric for x in judge({**ok, "noise_to_signal": None}, limits_for("Q8_0", cfg), 0.0)] == \
        ["noise_to_signal"]

    def entries(**fails):
        out = {}
        for label, size in (("Q4_K_M", 1), ("Q8_0", 2), ("F16", 4)):
            f = fails.get(label, [])
            out[label] = {"passed": not f, "size": size, "failures": f}
        return out
    kld = [{"metric": "kld_mean", "value": 0.1, "limit": 0.031, "why": "kld_mean 0.1 > 0.031"}]
    tmpl = [{"metric": "template", "value": None, "limit": None, "why": "template check failed: x"}]
    assert decide(entries(), "Q4_K_M", "block").served == "Q4_K_M"
    d = decide(entries(Q4_K_M=kld), "Q4_K_M", "block", model=MODEL, version="v2")
    assert d.served is None and "kld_mean 0.1 > 0.031" in d.reason and "Q8_0 passes" in d.reason
    assert decide(entries(Q4_K_M=kld), "Q4_K_M", "fallback").served == "Q8_0"   # the smallest that passes
    assert decide(entries(Q4_K_M=kld, Q8_0=kld), "Q4_K_M", "fallback").served == "F16"
    assert decide(entries(Q4_K_M=kld), "Q4_K_M", "warn").verdict == "warned"
    assert decide(entries(Q4_K_M=tmpl), "Q4_K_M", "warn").served is None
    assert decide(entries(Q4_K_M=tmpl), "Q4_K_M", "fallback").served is None

    for bad in ({"max_kld": {"Q9_X": 0.1}}, {"max_kld": {"Q4_K_M": 0}}, {"min_top1": 1.5}, {"on_fail": "ignore"}):
        with pytest.raises(ConfigError):
            config_from_dict({"models": {MODEL: {"base_model": "/b", "adapter": "/a", "port": 5000}}, "verify": bad})
