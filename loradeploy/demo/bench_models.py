"""Benchmark models: random weights at a chosen size, for timing merge, convert and quantize."""
from __future__ import annotations

import math
import time
from pathlib import Path

from ..errors import InputError
from ..fsutil import atomic_output
from .recipe import BUILD_VERSION, Progress, already_built, report_progress, write_marker
from .tokenizers import special_ids, write_llama_tokenizer
from .training import LORA_TARGETS, model_config


def _bench_shape(target_params: int, vocab: int) -> dict:
    hidden = (2048 if target_params >= 1_500_000_000 else 1024 if target_params >= 100_000_000
              else 512 if target_params >= 20_000_000 else 256)
    heads = hidden // 64
    kv_heads = max(1, heads // 2)
    inter = math.ceil(hidden * 8 / 3 / 256) * 256  # Llama's ratio, in whole K-quant blocks
    per_layer = 2 * hidden * heads * 64 + 2 * hidden * kv_heads * 64 + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((target_params - 2 * vocab * hidden - hidden) / per_layer))
    return dict(hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=inter, layers=layers)


def build_bench_llama(out_dir: Path, *, target_params: int = 350_000_000, seed: int = 0,
                      progress: Progress | None = None) -> Path:
    """A Llama-shaped model of about ``target_params`` parameters: random float16 weights and the
    demo SentencePiece tokenizer. It converts, quantizes and runs; it says nothing useful."""
    out_dir = Path(out_dir)
    params = {"kind": "bench-base", "target_params": int(target_params), "seed": seed,
              "version": BUILD_VERSION}
    if already_built(out_dir, params):
        return out_dir
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.monotonic()
    with atomic_output(out_dir, is_dir=True) as tmp:
        report_progress(progress, "bench base: tokenizer", 0, 1)
        write_llama_tokenizer(tmp, seed)
        tok = AutoTokenizer.from_pretrained(tmp)
        ids = special_ids(tok, "llama")
        config = model_config("llama", len(tok), ids, max_pos=4096, **_bench_shape(target_params, len(tok)))
        config.architectures = ["LlamaForCausalLM"]
        config.dtype = torch.float16
        with torch.device("meta"):  # names and shapes only, no memory
            shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
        gen = torch.Generator().manual_seed(seed)
        tensors = {}
        for i, (name, shape) in enumerate(shapes.items()):
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.float16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
            report_progress(progress, "bench base: weights", i + 1, len(shapes))
        report_progress(progress, "bench base: saving", 0, 1)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos_list"],
                         pad_token_id=ids["pad"]).save_pretrained(tmp)
        write_marker(tmp, {**params, "params": sum(math.prod(s) for s in shapes.values()),
                           "seconds": round(time.monotonic() - t0, 1)})
    return out_dir


def build_bench_adapter(base_dir: Path, out_dir: Path, *, r: int = 16, seed: int = 0,
                        progress: Progress | None = None) -> Path:
    """A random LoRA for ``base_dir`` in peft's layout (adapter_model.safetensors +
    adapter_config.json); every B is non-zero, so merging changes every targeted weight."""
    from transformers import AutoConfig

    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir)
    try:
        config = AutoConfig.from_pretrained(base_dir)
    except (OSError, ValueError) as exc:
        raise InputError(f"{base_dir} holds no readable config.json: {exc}") from None
    params = {"kind": "bench-adapter", "r": r, "seed": seed, "version": BUILD_VERSION, "base": str(base_dir)}
    if already_built(out_dir, params):
        return out_dir
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    hidden, inter = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"self_attn.q_proj": (hidden, q_out), "self_attn.k_proj": (hidden, kv_out),
              "self_attn.v_proj": (hidden, kv_out), "self_attn.o_proj": (q_out, hidden),
              "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    with atomic_output(out_dir, is_dir=True) as tmp:
        for layer in range(config.num_hidden_layers):
            for module, (fan_in, fan_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{module}"  # peft's key layout
                tensors[f"{key}.lora_A.weight"] = torch.randn((r, fan_in), generator=gen) / math.sqrt(fan_in)
                tensors[f"{key}.lora_B.weight"] = torch.randn((fan_out, r), generator=gen) * 0.01
            report_progress(progress, "bench adapter: weights", layer + 1, config.num_hidden_layers)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                   target_modules=LORA_TARGETS, base_model_name_or_path=str(base_dir)).save_pretrained(str(tmp))
        write_marker(tmp, params)
    return out_dir
