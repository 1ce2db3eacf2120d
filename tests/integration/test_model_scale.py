"""The scale harness's writer (loradeploy.demo.qwen_scale): a tiny Qwen2-shaped base through the same
code that writes the 0.5B/1.5B/7B ones, loaded back by transformers and peft."""
from __future__ import annotations

import json

import pytest

from loradeploy.demo.qwen_scale import (FIRST_ADDED_ID, IM_END_ID, QWEN25, QwenShape, build_qwen_base, config_json,
                                        param_count, scale_adapter, shard_plan)
from loradeploy.tools.safetensors_io import read_header

TINY = QwenShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, tied=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_scale")
    base = build_qwen_base(root / "Qwen2.5-tiny", TINY, shard_gb=0.008)   # 19.5 MB of embedding: 3 shards
    adapters = {k: scale_adapter(base, root / "adapters", k, base_name="Qwen/Qwen2.5-7B") for k in ("qv", "all-linear")}
    return base, adapters


def test_real_sizes_have_the_published_parameter_counts_and_shards():
    # the Qwen2.5 model cards: 0.49B, 1.54B, 7.61B; the 7B repository ships four shards
    assert {k: param_count(s) for k, s in QWEN25.items()} == {
        "0.5b": 494_032_768, "1.5b": 1_543_714_304, "7b": 7_615_616_512}
    assert {k: len(shard_plan(s, int(s.shard_gb * 1e9))) for k, s in QWEN25.items()} == {"0.5b": 1, "1.5b": 1, "7b": 4}
    c = config_json(QWEN25["7b"])
    assert (c["vocab_size"], c["tie_word_embeddings"], c["num_key_value_heads"]) == (152064, False, 4)


def test_shards_and_index_describe_every_tensor(tiny):
    base, _ = tiny
    index = json.loads((base / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in base.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    headers = {f: read_header(base / f) for f in files}
    names = {n: f for f, h in headers.items() for n in h if n != "__metadata__"}
    assert names == index["weight_map"]
    assert {h[n]["dtype"] for h in headers.values() for n in h if n != "__metadata__"} == {"BF16"}
    assert index["metadata"]["total_size"] == 2 * param_count(TINY)
    gen = json.loads((base / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [IM_END_ID, FIRST_ADDED_ID]


def test_transformers_loads_it_and_the_tokenizer_is_qwens(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = tiny
    model, info = AutoModelForCausalLM.from_pretrained(str(base), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(str(base))
    assert len(tok) == 151665   # 151643 BPE ranks + Qwen2.5's 22 added tokens
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<tool_call>", "<|file_sep|>"]) == [IM_END_ID, 151657, 151664]
    text = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(text)])).logits
    assert torch.isfinite(logits).all() and 0.05 < logits.float().std() < 1.0


def test_peft_adapters_load_onto_it_and_change_the_output(tiny):
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base, adapters = tiny
    x = torch.tensor([[9707, 11, 1879, 0]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)(x).logits
    for kind, path in adapters.items():
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "Qwen/Qwen2.5-7B" and cfg["r"] == 16
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            modules = {k.split(".")[-3] for k in f.keys()}
        assert modules == ({"q_proj", "v_proj"} if kind == "qv" else
                           {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(path))
        with torch.no_grad():
            assert (model(x).logits - ref).abs().max() > 1e-2, kind
