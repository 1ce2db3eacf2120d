"""Qwen2.5-shaped bases at their real sizes (0.5B, 1.5B, 7B) with random bf16 weights, for measuring
the pipeline at scale. Written shard by shard and tensor by tensor (a 7B never sits in memory: the
largest tensor, its 1.1 GB embedding, is the peak), with Qwen's real tokenizer (all 22 added tokens),
Qwen2.5's chat template, config.json and generation_config.json as the real repositories ship them.

The weights say nothing: N(0, 0.02) for matrices and biases, ones for norms, so a forward pass in
16 bits stays finite and every quantizer sees ordinary ranges.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError
from ..fsutil import atomic_output, atomic_write_text
from ..tools.safetensors_io import write_streaming
from .bench_models import build_bench_adapter
from .recipe import Progress, already_built, read_marker, report_progress, write_marker
from .tokenizers import write_qwen2_tokenizer

# The writer's own recipe version: a 15 GB base is rebuilt when this changes, not when the demo does.
SCALE_VERSION = 1
GB = 1000 ** 3


@dataclass(frozen=True)
class QwenShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 151936
    tied: bool = True
    max_positions: int = 32768
    max_window_layers: int = 0  # config.json only; 0 = layers
    shard_gb: float = 4.0       # the repositories' own split: a single file up to 4 GB

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# config.json of Qwen/Qwen2.5-0.5B, -1.5B and -7B (the bases; the -Instruct models have the same shapes)
QWEN25 = {
    "0.5b": QwenShape(896, 24, 14, 2, 4864, max_window_layers=24),
    "1.5b": QwenShape(1536, 28, 12, 2, 8960, max_positions=131072, max_window_layers=21),
    "7b": QwenShape(3584, 28, 28, 4, 18944, vocab=152064, tied=False, max_positions=131072, max_window_layers=28),
}
REPO_NAMES = {"0.5b": "Qwen/Qwen2.5-0.5B", "1.5b": "Qwen/Qwen2.5-1.5B", "7b": "Qwen/Qwen2.5-7B"}

# Qwen2.5's added tokens in id order from 151643; the tool-call and FIM ones are not "special".
QWEN_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
              ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
              ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
              ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
              ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
              ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
              ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False)]
FIRST_ADDED_ID = 151643
ENDOFTEXT_ID, IM_END_ID = 151643, 151645

QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")


def tensor_shapes(s: QwenShape) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of Qwen2ForCausalLM in module order, as (name, shape) of the safetensors file."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q, s.hidden)), (p + "self_attn.q_proj.bias", (q,)),
                (p + "self_attn.k_proj.weight", (kv, s.hidden)), (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, s.hidden)), (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (s.hidden, q)),
                (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
                (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
                (p + "mlp.down_proj.weight", (s.hidden, s.intermediate)),
                (p + "input_layernorm.weight", (s.hidden,)), (p + "post_attention_layernorm.weight", (s.hidden,))]
    out.append(("model.norm.weight", (s.hidden,)))
    if not s.tied:
        out.append(("lm_head.weight", (s.vocab, s.hidden)))
    return out


def param_count(s: QwenShape) -> int:
    return sum(math.prod(shape) for _, shape in tensor_shapes(s))


def config_json(s: QwenShape) -> dict:
    """config.json as the Qwen2.5 repositories write it."""
    return {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": ENDOFTEXT_ID, "hidden_act": "silu", "hidden_size": s.hidden, "initializer_range": 0.02,
            "intermediate_size": s.intermediate, "max_position_embeddings": s.max_positions,
            "max_window_layers": s.max_window_layers or s.layers, "model_type": "qwen2",
            "num_attention_heads": s.heads, "num_hidden_layers": s.layers, "num_key_value_heads": s.kv_heads,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": s.max_positions,
            "tie_word_embeddings": s.tied, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
            "use_cache": True, "use_sliding_window": False, "vocab_size": s.vocab}


def shard_plan(s: QwenShape, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors in module order, a new shard whenever the next tensor would pass ``shard_bytes``
    (transformers' own greedy split)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensor_shapes(s):
        n = 2 * math.prod(shape)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _random_bf16(shape: tuple[int, ...], std: float, gen, chunk_elems: int = 1 << 24):
    """N(0, std) in bf16 as a flat uint8 view, drawn in float32 chunks of ``chunk_elems`` (64 MB)."""
    import torch

    out = torch.empty(math.prod(shape), dtype=torch.bfloat16)
    for i in range(0, out.numel(), chunk_elems):
        n = min(chunk_elems, out.numel() - i)
        out[i:i + n] = torch.randn(n, generator=gen).mul_(std)
    return out.view(torch.uint8).numpy()


def _tensor_bytes(name: str, shape: tuple[int, ...], gen):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(math.prod(shape), dtype=torch.bfloat16).view(torch.uint8).numpy()
    return _random_bf16(shape, 0.02, gen)


def write_qwen25_tokenizer(d: Path) -> None:
    """Qwen's BPE (the demo's Qwen2 tokenizer) with all of Qwen2.5's added tokens and its chat template."""
    from tokenizers import AddedToken, Tokenizer

    write_qwen2_tokenizer(d)
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    for i, (tok, special) in enumerate(QWEN_ADDED):
        if tk.token_to_id(tok) is None:
            t = AddedToken(tok, normalized=False, special=special)
            (tk.add_special_tokens if special else tk.add_tokens)([t])
        if tk.token_to_id(tok) != FIRST_ADDED_ID + i:
            raise RuntimeError(f"{tok} got id {tk.token_to_id(tok)}, Qwen2.5 has {FIRST_ADDED_ID + i}")
    tk.save(str(d / "tokenizer.json"), pretty=False)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {
        str(FIRST_ADDED_ID + i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                                  "single_word": False, "special": sp} for i, (t, sp) in enumerate(QWEN_ADDED)}
    extra = [t for t, sp in QWEN_ADDED[1:] if sp]
    cfg.update(additional_special_tokens=extra, chat_template=QWEN25_CHAT_TEMPLATE, model_max_length=131072)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    smap = json.loads((d / "special_tokens_map.json").read_text())
    smap["additional_special_tokens"] = extra
    (d / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")


def build_qwen_base(out_dir: Path, shape: QwenShape | str, *, seed: int = 0, shard_gb: float | None = None,
                    progress: Progress | None = None) -> Path:
    """Build (or reuse) a Qwen2.5-shaped base in Hugging Face layout at ``out_dir``.

    ``shape`` is a QwenShape or a key of QWEN25. Shards of at most ``shard_gb`` (default: the shape's,
    as its repository splits it); one file is ``model.safetensors``, several come with
    ``model.safetensors.index.json``. Memory stays at about one tensor plus a 64 MB draw."""
    import torch

    if isinstance(shape, str):
        if shape not in QWEN25:
            raise InputError(f"unknown Qwen2.5 size {shape!r}", hint=f"known: {', '.join(QWEN25)}")
        shape = QWEN25[shape]
    out_dir = Path(out_dir)
    shard_bytes = int((shard_gb or shape.shard_gb) * GB)
    params = {"kind": "qwen-scale-base", "shape": asdict(shape), "seed": seed, "shard_bytes": shard_bytes,
              "version": SCALE_VERSION}
    if already_built(out_dir, params):
        return out_dir
    t0 = time.monotonic()
    gen = torch.Generator().manual_seed(seed)
    shards = shard_plan(shape, shard_bytes)
    total = sum(2 * math.prod(sh) for sh_list in shards for _, sh in sh_list)
    n_tensors = sum(len(x) for x in shards)
    with atomic_output(out_dir, is_dir=True) as tmp:
        report_progress(progress, "qwen base: tokenizer", 0, 1)
        write_qwen25_tokenizer(tmp)
        (tmp / "config.json").write_text(json.dumps(config_json(shape), indent=2) + "\n")
        gen_cfg = {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
                   "pad_token_id": ENDOFTEXT_ID, "do_sample": False, "max_new_tokens": 2048,
                   "transformers_version": "4.43.1"}
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        weight_map, done = {}, 0
        for k, specs in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else \
                f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            shapes = dict(specs)

            def produce(name: str, shapes=shapes):
                nonlocal done
                done += 1
                report_progress(progress, "qwen base: weights", done, n_tensors)
                return _tensor_bytes(name, shapes[name], gen)

            write_streaming(tmp / fname, [(n, "BF16", list(sh)) for n, sh in specs], produce,
                            metadata={"format": "pt"})
            weight_map.update({n: fname for n, _ in specs})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        write_marker(tmp, {**params, "params": param_count(shape), "bytes": total,
                           "seconds": round(time.monotonic() - t0, 1)})
    return out_dir



ADAPTER_KINDS = {"all-linear": None, "qv": ("q_proj", "v_proj")}


def cut_adapter(src: Path, out: Path, modules: tuple[str, ...]) -> Path:
    """A copy of the peft adapter ``src`` that keeps only ``modules`` (e.g. q_proj, v_proj); redone
    when ``src`` or its adapter_config.json changes."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    cfg = {**json.loads((src / "adapter_config.json").read_text()), "target_modules": list(modules)}
    params = {"kind": "cut-adapter", "source": read_marker(src), "config": cfg}
    if already_built(out, params):
        return out
    with atomic_output(out, is_dir=True) as tmp:
        t = load_file(str(src / "adapter_model.safetensors"))
        keep = {k: v for k, v in t.items() if any(f".{m}." in k for m in modules)}
        save_file(keep, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        write_marker(tmp, params)
    return out


def scale_adapter(base_dir: Path, folder: Path, kind: str = "all-linear", *, base_name: str | None = None,
                  r: int = 16, seed: int = 0) -> Path:
    """A random peft LoRA (rank ``r``, every lora_B non-zero) for ``base_dir`` at ``folder/kind``:
    ``all-linear`` (q,k,v,o,gate,up,down) or ``qv`` (cut from the all-linear one). Its
    adapter_config.json names ``base_name`` (e.g. "Qwen/Qwen2.5-7B"), as one trained on the hub model does."""
    if kind not in ADAPTER_KINDS:
        raise InputError(f"unknown adapter kind {kind!r}", hint=f"known: {', '.join(ADAPTER_KINDS)}")
    lin = build_bench_adapter(base_dir, Path(folder) / "all-linear", r=r, seed=seed)
    cfg = json.loads((lin / "adapter_config.json").read_text())
    if base_name and cfg.get("base_model_name_or_path") != base_name:
        atomic_write_text(lin / "adapter_config.json",
                          json.dumps({**cfg, "base_model_name_or_path": base_name}, indent=2) + "\n")
    modules = ADAPTER_KINDS[kind]
    return lin if modules is None else cut_adapter(lin, Path(folder) / kind, modules)
