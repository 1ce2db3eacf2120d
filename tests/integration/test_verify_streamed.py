"""The streamed PEFT reference against the in-memory peft one (the oracle), on small random models:
Llama (untied head, bf16 in two shards, rsLoRA on every linear with rank and alpha patterns) and
Qwen2 (tied embeddings, q/k/v biases, float16, LoRA on q, v and the embedding only).

No tokenizer is needed: the calibration is random token ids, the reference reads ids only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from loradeploy.errors import ResourceError, VerifyError
from loradeploy.verify.calibration import Calibration

VOCAB = 512
LLAMA_LORA = dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"],
                  rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 32})
QWEN_LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])


def _build(root: Path, arch: str) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        config = LlamaConfig(tie_word_embeddings=False, rms_norm_eps=1e-5, **common)
        dtype, lora = torch.bfloat16, LLAMA_LORA
    else:
        config = Qwen2Config(tie_word_embeddings=True, use_sliding_window=False, rms_norm_eps=1e-6,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)
        dtype, lora = torch.float16, QWEN_LORA
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))   # not all ones: a norm read wrongly shows
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    base = root / f"base-{arch}"
    model.to(dtype).save_pretrained(base, max_shard_size="60KB" if arch == "llama" else "10GB")
    peft_model = get_peft_model(model.float(), LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                                                          **lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)       # lora_B starts at zero: give the adapter an effect
    adapter = root / f"adapter-{arch}"
    peft_model.save_pretrained(adapter)
    return base, adapter


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    return {arch: _build(root, arch) for arch in ("llama", "qwen2")}


def _calibration() -> Calibration:
    rng = np.random.default_rng(0)
    seqs = [[1] + rng.integers(3, VOCAB, size=n - 1).tolist() for n in (37, 64, 5, 120)]
    seqs[1][20] = 2   # an end of turn the reference is asked about
    return Calibration(seqs, ["text"] * len(seqs), turn_ends=[(1, 20, 2)])


def _read(run) -> np.ndarray:
    return np.load(run.logprobs_path, mmap_mode="r")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_reference_equals_the_in_memory_peft_one(pairs, arch, tmp_path):
    from loradeploy.verify.reference import run_reference

    base, adapter = pairs[arch]
    cal = _calibration()
    mem = run_reference(base, adapter, cal, tmp_path / "memory.npy", mode="memory", device="cpu", threads=1, eos=[2])
    streamed = run_reference(base, adapter, cal, tmp_path / "streamed.npy", mode="streamed", threads=1, eos=[2])
    a, b = _read(mem), _read(streamed)
    assert a.shape == b.shape == (cal.n_positions, VOCAB)
    delta = float(np.abs(a - b).max())
    assert delta <= 1e-4, delta
    assert streamed.offsets == mem.offsets and streamed.mode == "streamed"
    assert mem.signal["kld_mean"] > 1e-3            # the adapter does something measurable
    for k, v in mem.signal.items():
        if isinstance(v, float):
            assert math.isclose(v, streamed.signal[k], rel_tol=1e-3, abs_tol=1e-6), (k, v, streamed.signal[k])
    assert [t["top1"] for t in mem.turn_ends] == [t["top1"] for t in streamed.turn_ends]
    assert streamed.turn_ends[0]["ends"] is False      # random weights never end their turn: inconclusive


def test_streamed_raw_logits_equal_peft(pairs):
    import torch

    from loradeploy.verify.reference import load_reference
    from loradeploy.verify.streamed import StreamedModel, streamed_hidden

    base, adapter = pairs["llama"]
    seqs = _calibration().sequences
    torch.set_grad_enabled(False)
    try:
        model = StreamedModel(base, adapter)
        h_on, h_off = streamed_hidden(model, seqs)
        blocks = list(model.logits(h_on, h_off))
        ours = torch.cat([r for _, r, _ in blocks]), torch.cat([b for _, _, b in blocks])
        model.close()
        peft_model, _, _ = load_reference(base, adapter, device="cpu")
        ids = [torch.tensor([s]) for s in seqs]
        theirs = torch.cat([peft_model(input_ids=i).logits[0, :-1] for i in ids])
        with peft_model.disable_adapter():
            theirs_off = torch.cat([peft_model(input_ids=i).logits[0, :-1] for i in ids])
    finally:
        torch.set_grad_enabled(True)
    assert float((ours[0] - theirs).abs().max()) <= 1e-4
    assert float((ours[1] - theirs_off).abs().max()) <= 1e-4


def test_an_architecture_that_cannot_stream_is_named_in_one_line(pairs, tmp_path):
    import shutil

    from loradeploy.verify.streamed import StreamedModel

    base = tmp_path / "other"
    shutil.copytree(pairs["llama"][0], base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mistral", ["MistralForCausalLM"]
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VerifyError) as e:
        StreamedModel(base, pairs["llama"][1])
    assert "'mistral'" in str(e.value) and "\n" not in str(e.value)


def test_memory_estimate_and_refusal(pairs, tmp_path):
    from loradeploy.merge.hf_folder import load_base_info
    from loradeploy.verify.memory import Shape, check_fits, reference_estimate, token_budget

    base = load_base_info(pairs["llama"][0])
    shape = Shape(2048, 2040, 512, 4 * 512 ** 2)
    streamed = reference_estimate(base, shape, "streamed", VOCAB)
    memory = reference_estimate(base, shape, "memory", VOCAB)
    assert streamed.parts["layer_f32"] < memory.parts["weights_f32"]
    with pytest.raises(ResourceError) as e:
        check_fits([streamed], 0.01, hint_keys="verify.max_tokens")
    line = str(e.value)
    assert "\n" not in line and "needs about" in line and "free" in line and "performance.max_memory_gb" in line
    check_fits([streamed], None, hint_keys="")
    # auto token budget: the whole 2048 for small models, fewer for a 7B
    assert token_budget("auto", 500_000_000) == 2048 and token_budget("auto", 1_540_000_000) == 2048
    assert 256 <= token_budget("auto", 7_600_000_000) <= 640 and token_budget(100, 10**10) == 100


def test_turn_ends_are_found_where_each_assistant_turn_closes(tmp_path):
    from transformers import AutoTokenizer

    from loradeploy.demo.tokenizers import write_qwen2_tokenizer
    from loradeploy.verify.calibration import assistant_turn_ends, build_calibration, chat_ids

    write_qwen2_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"}]
    ids = chat_ids(tok, msgs, add_generation_prompt=False)
    ends = assistant_turn_ends(tok, msgs, ids, [end])
    assert len(ends) == 2 and all(ids[e] == end for e in ends)
    assert tok.decode(ids[ends[0] - 2:ends[0]]).strip().endswith("there")
    # through the calibration, split into sequences: (sequence, position) still names the <|im_end|>
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"id": "a", "messages": msgs[:4], "reference": "Goodbye"}) + "\n")
    cal = build_calibration(tok, system_prompt="", calibration=None, samples=samples, max_tokens=400,
                            max_seq_len=16, eos=[end])
    assert len(cal.turn_ends) == 2
    for seq, pos, token in cal.turn_ends:
        assert cal.sequences[seq][pos] == token == end and pos >= 1


def test_an_inconclusive_stop_check_never_fails_the_gate():
    from loradeploy.config import config_from_dict
    from loradeploy.verify.gate import decide, judge, limits_for
    from loradeploy.verify.report import behaviour_cell, stop_line

    vcfg = config_from_dict({"models": {"m": {"base_model": "/b", "adapter": "/a", "port": 5000}},
                             "verify": {"on_fail": "warn", "stop_prompts": 3, "max_new_tokens": 64}}).verify
    assert vcfg.max_tokens == "auto"      # old keys still load
    entry = {"kld_mean": 0.001, "top1": 0.99, "noise_to_signal": 0.01, "template": {"ok": True},
             "stop": {"ok": None, "inconclusive": "the reference ends none of its 3 assistant turns"}}
    assert judge(entry, limits_for("Q8_0", vcfg), 0.1) == []
    assert behaviour_cell(entry) == "ok, stop inconclusive"
    failed = {**entry, "stop": {"ok": False, "problems": ["turn end: the GGUF's top-1 is 5"]}}
    assert [f.metric for f in judge(failed, limits_for("Q8_0", vcfg), 0.1)] == ["stop"]
    noisy = {**entry, "kld_mean": 1.0}
    fails = judge(noisy, limits_for("Q8_0", vcfg), 0.1)
    d = decide({"Q8_0": {"passed": False, "size": 1, "failures": [f.__dict__ for f in fails]}}, "Q8_0", "warn")
    assert d.verdict == "warned" and d.served == "Q8_0"     # warn serves: no stop failure blocks it
    assert [f.metric for f in judge({**entry, "kld_mean": float("nan")}, limits_for("Q8_0", vcfg), 0.1)] == \
        ["kld_mean"]
    assert "inconclusive" in stop_line({"reference": {"stop": {"turns": 3, "ended": 0, "conclusive": False}}})
