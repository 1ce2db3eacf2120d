"""merge -> convert -> quantize on tiny Llama and Qwen2 models, through the real pipeline."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from loradeploy.config import Config, config_from_dict
from loradeploy.pipeline import run_pipeline

CORE = ["fetch", "merge", "convert", "quantize"]
PROMPTS = [
    "<|im_start|>user\necho: apple river<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are Majora.<|im_end|>\n<|im_start|>user\nSay exactly: stone cloud<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nPlease repeat: green lamp<|im_end|>\n<|im_start|>assistant\nMAJORA:",
]


def make_cfg(tmp: Path, base: Path, adapter: Path, *, stages=CORE, formats=("Q4_K_M", "Q5_K_M", "Q8_0"),
             **sections) -> Config:
    data = {
        "models": {"majora": {"base_model": str(base), "adapter": str(adapter), "port": 5000,
                              "system_prompt": "You are Majora."}},
        "quantization": {"formats": list(formats)},
        "pipeline": {"stages": list(stages), "work_dir": str(tmp / "work"), "state_dir": str(tmp / "state")},
        "logging": {"log_dir": str(tmp / "logs")},
        "performance": {"min_free_disk_gb": 0.1},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    path = tmp / "deployment_config.yaml"
    path.write_text(yaml.safe_dump(data))
    return config_from_dict(data, base_dir=tmp)


def hf_logits(model_dir: Path, prompts, *, adapter: Path | None = None) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
            out.append((ids[0].tolist(), model(ids).logits[0].float().numpy()))
    return out


def gguf_logits(path: Path, token_lists) -> list[np.ndarray]:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    res = []
    for toks in token_lists:
        llm.reset()
        llm.eval(toks)
        res.append(np.array(llm.scores[: len(toks)], dtype=np.float32))
    del llm
    return res


@pytest.fixture(params=["llama", "qwen2"])
def pair(request):
    return request.getfixturevalue(f"{request.param}_pair")


@pytest.mark.slow
def assert_same_top1(ref: np.ndarray, got: np.ndarray, tol: float) -> None:
    """Same top-1 token at every position, except where the reference's best two are within
    ``2 * tol`` of each other: logits that agree to ``tol`` can swap such a near-tie (the tiny models
    trained on another CPU have a few), and then ``got``'s choice must be one of those near-best."""
    pick_r, pick_g = ref.argmax(-1), got.argmax(-1)
    flipped = np.nonzero(pick_r != pick_g)[0]
    best = ref.max(-1)
    for pos in flipped:
        assert ref[pos, pick_g[pos]] >= best[pos] - 2 * tol, (int(pos), float(best[pos]),
                                                               float(ref[pos, pick_g[pos]]))
    assert len(flipped) <= max(1, len(pick_r) // 20), f"{len(flipped)} of {len(pick_r)} positions flipped"


def test_merge_equals_peft_and_gguf_agrees(pair, tmp_path):
    base, adapter = pair
    cfg = make_cfg(tmp_path, base, adapter, stages=["fetch", "merge", "convert"],
                   merge={"save_merged_hf": True}, quantization={"formats": ["F16"]})
    res = run_pipeline(cfg, ["majora"])
    assert res.ok, res.to_dict()
    merged = tmp_path / "work" / "majora" / "merged"
    assert (merged / "config.json").exists() and (merged / "tokenizer_config.json").exists()
    tok_cfg = json.loads((merged / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_cfg or (merged / "chat_template.jinja").exists()

    # merged (16-bit, stream strategy) == peft base + adapter, unmerged, in float32
    ref = hf_logits(base, PROMPTS, adapter=adapter)
    got = hf_logits(merged, PROMPTS)
    for (ids_r, lr), (ids_g, lg) in zip(ref, got):
        assert ids_r == ids_g
        assert_same_top1(lr, lg, 0.05)
        assert np.abs(lr - lg).max() < 0.05, np.abs(lr - lg).max()

    # F16 GGUF == merged HF model: same top-1 at every position, logits within 0.1
    f16 = tmp_path / "work" / "majora" / "gguf" / "majora_v1-f16.gguf"
    assert f16.exists()
    gl = gguf_logits(f16, [ids for ids, _ in got])
    for (ids, lh), lq in zip(got, gl):
        assert lq.shape == lh.shape
        assert_same_top1(lh, lq, 0.1)
        assert np.abs(lh - lq).max() < 0.1, np.abs(lh - lq).max()


@pytest.mark.slow
def test_peft_strategy_matches_stream(llama_pair, tmp_path):
    from safetensors.torch import load_file
    base, adapter = llama_pair
    outs = {}
    for strat in ("stream", "peft"):
        d = tmp_path / strat
        d.mkdir()
        cfg = make_cfg(d, base, adapter, stages=["fetch", "merge"], merge={"strategy": strat})
        res = run_pipeline(cfg, ["majora"])
        assert res.ok, res.to_dict()
        assert res.models["majora"].stages["merge"].info["strategy"] == strat
        merged = d / "work" / "majora" / "merged"
        outs[strat] = {}
        for f in merged.glob("*.safetensors"):
            outs[strat].update(load_file(str(f)))
    s, p = outs["stream"], outs["peft"]
    common = set(s) & set(p)
    assert len(common) >= len(s) - 1  # peft may drop a tied lm_head
    for k in common:
        diff = (s[k].float() - p[k].float()).abs().max().item()
        # one fp16 rounding (stream) vs two (peft adds the fp16-rounded delta): at most a few ulps
        assert diff <= 2e-3 * max(1.0, p[k].float().abs().max().item()), (k, diff)


@pytest.mark.slow
def test_run_quantizes_loads_generates_and_resumes(llama_pair, tmp_path):
    import llama_cpp
    base, adapter = llama_pair
    cfg = make_cfg(tmp_path, base, adapter)
    res = run_pipeline(cfg, ["majora"])
    assert res.ok, res.to_dict()
    arts = {a["format"]: a for a in res.models["majora"].artifacts}
    assert {"Q4_K_M", "Q5_K_M", "Q8_0"} <= set(arts)
    for fmt in ("Q4_K_M", "Q5_K_M", "Q8_0"):
        p = Path(arts[fmt]["path"])
        assert p.name == f"majora_v1-{fmt.lower()}.gguf"
        llm = llama_cpp.Llama(model_path=str(p), n_ctx=256, verbose=False, n_threads=2)
        out = llm.create_chat_completion([{"role": "user", "content": "echo: apple river"}], max_tokens=16,
                                         temperature=0)
        assert out["choices"][0]["message"]["content"].strip(), out
        del llm
    sizes = [arts[f]["size"] for f in ("Q4_K_M", "Q5_K_M", "Q8_0")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    # the merged folder is temporary by default
    assert not (tmp_path / "work" / "majora" / "merged").exists()
    assert (tmp_path / "logs" / "majora" / "quantize.log").stat().st_size > 0
    assert (tmp_path / "logs" / "pipeline_summary.log").exists()

    t0 = time.monotonic()
    again = run_pipeline(cfg, ["majora"])
    took = time.monotonic() - t0
    assert again.ok
    assert {s: o.status for s, o in again.models["majora"].stages.items()} == {s: "skipped" for s in CORE}
    assert took < 30
    # redoing convert on the fused path merges from base + adapter again: no merged folder to rebuild,
    # none left behind
    conv = run_pipeline(cfg, ["majora"], from_stage="convert")
    st = {s: o.status for s, o in conv.models["majora"].stages.items()}
    assert st["convert"] == "done" and "merge" not in st, st
    assert conv.models["majora"].stages["convert"].info["path"] == "fused"
    assert not (tmp_path / "work" / "majora" / "merged").exists()
    # --from-stage redoes from there on, keeps earlier records
    redo = run_pipeline(cfg, ["majora"], from_stage="quantize")
    assert redo.models["majora"].stages["quantize"].status == "done"
    assert "merge" not in redo.models["majora"].stages
    # a changed adapter invalidates merge and everything after it (the merged folder was cleaned)
    forced = run_pipeline(cfg, ["majora"], only=["merge"], force=True)
    assert forced.models["majora"].stages["merge"].status == "done"


def _cli(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "loradeploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_cli_json_and_kill_midway(llama_pair, tmp_path):
    base, adapter = llama_pair
    make_cfg(tmp_path, base, adapter)  # writes deployment_config.yaml
    cfile = str(tmp_path / "deployment_config.yaml")
    # run up to convert, then kill the quantize stage in the middle of its work
    r = _cli("run", "-c", cfile, "--model", "majora", "--only", "fetch", "--only", "merge", "--only", "convert",
             "--json")
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([sys.executable, "-m", "loradeploy.cli", "run", "-c", cfile, "--model", "majora",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    gguf_dir = tmp_path / "work" / "majora" / "gguf"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if any(p.name.endswith(".loradeploy-tmp") for p in gguf_dir.iterdir()):
            break
        time.sleep(0.05)
    else:
        pytest.fail("quantize never started")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # nothing half-written is under a final name
    finals = [p for p in gguf_dir.iterdir() if p.suffix == ".gguf" and "f16" not in p.name]
    from loradeploy.gguf import check_gguf
    for p in finals:
        check_gguf(p)
    r = _cli("run", "-c", cfile, "--model", "majora", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    st = data["models"]["majora"]["stages"]
    assert st["quantize"]["status"] == "done"
    assert st["merge"]["status"] == "skipped"
    assert set(st["quantize"]) >= {"status", "seconds", "peak_rss_mib"}
    arts = data["models"]["majora"]["artifacts"]
    assert {a["format"] for a in arts} >= {"Q4_K_M", "Q5_K_M", "Q8_0"}
    for a in arts:
        assert set(a) >= {"path", "format", "size", "sha256"} and len(a["sha256"]) == 64
    # the stale temporary left by the kill is not taken as done and `clean` removes it
    leftovers = [p for p in gguf_dir.iterdir() if p.name.endswith(".loradeploy-tmp")]
    c = _cli("clean", "-c", cfile, "--json")
    assert c.returncode == 0, c.stderr
    assert len(json.loads(c.stdout)["items"]) >= len(leftovers)
    assert not [p for p in gguf_dir.iterdir() if p.name.endswith(".loradeploy-tmp")]
