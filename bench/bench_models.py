"""The benchmark's Llama-shaped model (~350M params, random fp16 weights) and a random LoRA.

Random weights are enough here: merge, convert and quantize cost the same for any values.
The tokenizer is the demo's locally trained SentencePiece one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from loradeploy.fsutil import atomic_output

MARK = "bench-build.json"


def _done(out: Path, params: dict) -> bool:
    m = out / MARK
    return m.exists() and json.loads(m.read_text()) == params


def build_bench_llama(out_dir: Path, *, target_params: int = 350_000_000, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loradeploy.demo_models import build_base
    out_dir = Path(out_dir)
    params = {"target_params": target_params, "seed": seed, "v": 1}
    if _done(out_dir, params):
        return out_dir
    tok_src = build_base(out_dir.parent / "tiny-tokenizer-src", "llama")
    hidden, inter, heads, kv = 1024, 2816, 16, 8
    per_layer = 2 * hidden * hidden + 2 * hidden * (hidden * kv // heads) + 3 * hidden * inter
    vocab = json.loads((tok_src / "config.json").read_text())["vocab_size"]
    layers = max(1, round((target_params - 2 * vocab * hidden) / per_layer))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=False, torch_dtype="float16",
                      **{k: v for k, v in json.loads((tok_src / "config.json").read_text()).items()
                         if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    with atomic_output(out_dir, is_dir=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="10GB")
        for f in tok_src.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
                shutil.copy2(f, tmp / f.name)
        (tmp / MARK).write_text(json.dumps(params))
    return out_dir


def build_bench_adapter(base_dir: Path, out_dir: Path, *, r: int = 16, seed: int = 0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    out_dir = Path(out_dir)
    params = {"base": str(base_dir), "r": r, "seed": seed, "v": 1}
    if _done(out_dir, params):
        return out_dir
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float16)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    with atomic_output(out_dir, is_dir=True) as tmp:
        pm.save_pretrained(str(tmp), safe_serialization=True)
        c = json.loads((tmp / "adapter_config.json").read_text())
        c["base_model_name_or_path"] = str(base_dir)
        (tmp / "adapter_config.json").write_text(json.dumps(c, indent=2))
        (tmp / MARK).write_text(json.dumps(params))
    return out_dir
