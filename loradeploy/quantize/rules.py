"""llama.cpp's choice of type per tensor, for the formats and architectures the engine handles.

Ported from ``src/llama-quant.cpp`` of the llama.cpp vendored in llama-cpp-python 0.3.36
(``tensor_allows_quantization``, ``llama_tensor_get_type`` and its ``_impl``, ``tensor_type_fallback``).
Only the branches that can fire for the six formats below on a dense (no experts) Llama or Qwen2
are kept; anything else is refused with ``Unsupported`` so the caller hands it to llama.cpp. A new
pinned llama.cpp version must be re-read against this file: the test that compares every
tensor's type with llama_model_quantize's output is what says it still holds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .gguf_out import TYPE_NAMES, TYPE_SIZES, SourceGGUF, Tensor, n_dims, type_name

LLAMA_CPP_VERSION = "0.3.36"   # the llama-cpp-python release these rules were read from
ARCHS = frozenset({"llama", "qwen2"})

F32, F16, Q4_0, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 14, 30
TYPE_IDS = {v: k for k, v in TYPE_NAMES.items()}   # the types the config's options may name
IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, IQ1_M = 16, 17, 18, 19, 20, 21, 22, 23, 29
# tensor_requires_imatrix: these cannot be written without one (token_embd and output excepted)
NEEDS_IMATRIX = frozenset({IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_M, IQ1_S})

# format -> (llama_ftype, the ftype's default tensor type)
FORMATS: dict[str, tuple[int, int]] = {
    "Q8_0": (7, Q8_0), "Q4_K_S": (14, Q4_K), "Q4_K_M": (15, Q4_K),
    "Q5_K_S": (16, Q5_K), "Q5_K_M": (17, Q5_K), "Q6_K": (18, Q6_K),
}

# substrings that keep a tensor in its stored type (tensor_allows_quantization; the
# architecture-specific ones of other families can never match a Llama/Qwen2 tensor name)
_NEVER = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
          "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
          "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
          "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
          "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
          "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
          "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
          "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
          "mm.a.code_embd")
_NEVER_EXACT = ("position_embd.weight", "token_types.weight")

# (substring, category) in the order llama.cpp tests them
_CATEGORIES = (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
               ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
               ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))

# a 256-block type that does not fit a row falls back to a 32-block one
_FALLBACK = {Q2_K: Q4_0, Q3_K: Q4_0, Q4_K: Q5_0, Q5_K: Q5_1, Q6_K: Q8_0,
             **dict.fromkeys((IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_XS), IQ4_NL)}


class Unsupported(Exception):
    """This model / format / option is not handled here; llama.cpp's quantizer is."""


@dataclass(frozen=True)
class Options:
    output_tensor_type: int | None = None       # --output-tensor-type
    token_embedding_type: int | None = None     # --token-embedding-type
    quantize_output: bool = True                # not --leave-output-tensor
    pure: bool = False                          # --pure
    # --tensor-type / --tensor-type-file: (lower-cased regex, type), the first that matches a tensor wins
    overrides: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, output_tensor_type: str | None, token_embedding_type: str | None, leave_output_tensor: bool,
           pure: bool) -> "Options":
        """From llama-quantize's option names; a type this engine cannot write makes the plan Unsupported."""
        def tid(name: str | None) -> int | None:
            return None if not name else TYPE_IDS.get(name.upper(), -1)
        return cls(tid(output_tensor_type), tid(token_embedding_type), not leave_output_tensor, pure)

    @classmethod
    def of_config(cls, q) -> "Options":
        """From the quantization section of the config."""
        return cls.of(q.output_tensor_type, q.token_embedding_type, q.leave_output_tensor, q.pure)


@dataclass(frozen=True)
class Model:
    arch: str
    n_layer: int
    is_70b: bool          # LLM_TYPE_70B: attn_v gets more bits


def model_of(src: SourceGGUF) -> Model:
    arch = src.arch
    if arch not in ARCHS:
        raise Unsupported(f"architecture {arch or '?'} (the engine knows {', '.join(sorted(ARCHS))})")
    n_layer = src.get(f"{arch}.block_count")
    n_head, n_head_kv = src.get(f"{arch}.attention.head_count"), src.get(f"{arch}.attention.head_count_kv")
    if not isinstance(n_layer, int) or n_layer <= 0:
        raise Unsupported(f"{arch}.block_count is missing")
    if src.get(f"{arch}.expert_count") or any(len(t.ne) > 2 and t.ne[2] > 1 for t in src.tensors):
        raise Unsupported("mixture-of-experts models")
    if src.alignment != 32 or (src.get("split.count") or 1) != 1:
        raise Unsupported("split files or a non-default alignment")
    if n_layer == 80 and not (isinstance(n_head, int) and isinstance(n_head_kv, int)):
        raise Unsupported("per-layer head counts on an 80-layer model")
    # models/llama.cpp: 80 layers with grouped KV is 70B (equal heads is 65B); models/qwen2.cpp: 80 is 70B
    is_70b = n_layer == 80 and (arch == "qwen2" or n_head != n_head_kv)
    return Model(arch, n_layer, is_70b)


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for sub, cat in _CATEGORIES:
        if sub in name:
            return cat
    return "other"


def allows_quantization(t: Tensor, opts: Options) -> bool:
    if n_dims(t.ne) < 2:
        return False
    name = t.name
    # llama.cpp tests rfind("weight") == size - 6, which also holds for a 5-character name
    # without "weight" (npos == size - 6 in unsigned arithmetic)
    ends = name.endswith("weight") or (len(name) == 5 and "weight" not in name)
    if not ends or any(s in name for s in _NEVER) or name in _NEVER_EXACT:
        return False
    return opts.quantize_output or name != "output.weight"


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback_type(ncols: int, ty: int) -> int:
    """tensor_type_fallback: ``ty``, or what llama.cpp writes instead for rows of ``ncols`` it does not fit."""
    if ty not in TYPE_SIZES:
        raise Unsupported(f"tensor type {ty}")
    blck = TYPE_SIZES[ty][0]
    if ncols % blck == 0:
        return ty
    if ty in _FALLBACK:
        ty = _FALLBACK[ty]
    elif blck > 32:
        raise Unsupported(f"no fallback for type {type_name(ty)}")
    return ty if ncols % TYPE_SIZES[ty][0] == 0 else F16


class _Counters:
    def __init__(self, tensors: list[Tensor], model: Model):
        self.n_wv = sum(category(t.name) == "attn_v" for t in tensors)
        self.n_layer = model.n_layer     # n_ffn_down = n_layer_all
        self.i_wv = self.i_down = 0
        self.tied = not any(t.name == "output.weight" for t in tensors)


def _impl(t: Tensor, cat: str, ty: int, ftype: int, model: Model, opts: Options, c: _Counters) -> int:
    if cat == "output" or (c.tied and cat == "token_embd"):
        if opts.output_tensor_type is not None:
            return opts.output_tensor_type
        if t.n_per_row % TYPE_SIZES[ty][0] != 0:
            return Q8_0
        return ty if ty == Q8_0 else Q6_K
    if cat == "token_embd":
        return ty           # the IQ/TQ special cases are not among our formats
    if cat == "attn_v":
        if ftype in (15, 17) and _more_bits(c.i_wv, c.n_wv):
            ty = Q6_K
        elif ftype == 14 and c.i_wv < 4:
            ty = Q5_K
        if model.is_70b and ty in (Q3_K, Q4_K):
            ty = Q5_K
        c.i_wv += 1
        return ty
    if cat == "ffn_down":
        i, n = c.i_down, c.n_layer
        if ftype in (15, 17) and _more_bits(i, n):
            ty = Q6_K
        elif ftype == 14 and i < n // 8:
            ty = Q5_K
        c.i_down += 1
    return ty


def _manual(name: str, patterns: list[tuple[re.Pattern, int]]) -> int | None:
    """llama_tensor_get_type: the first override whose regex is found in the name (std::regex_search,
    ECMAScript; the recipes written here use only syntax both dialects read alike)."""
    return next((ty for pat, ty in patterns if pat.search(name)), None)


def requires_imatrix(name: str, ty: int) -> bool:
    return ty in NEEDS_IMATRIX and category(name) not in ("token_embd", "output")


def tensor_types(order: list[Tensor], model: Model, fmt: str, opts: Options = Options(),
                 has_imatrix: bool = False) -> list[int]:
    """The type of each tensor of ``order`` (llama_model_loader order) in format ``fmt``."""
    if fmt not in FORMATS:
        raise Unsupported(f"format {fmt}")
    ftype, default = FORMATS[fmt]
    c = _Counters(order, model)
    patterns = [(re.compile(p), ty) for p, ty in opts.overrides]
    out = []
    for t in order:
        if t.ggml_type not in (F32, F16, BF16):
            raise Unsupported(f"source tensor {t.name} is already quantized")
        if not allows_quantization(t, opts):
            out.append(t.ggml_type)
            continue
        cat = category(t.name)
        if opts.token_embedding_type is not None and cat == "token_embd":
            ty = opts.token_embedding_type
        elif opts.output_tensor_type is not None and cat == "output":
            ty = opts.output_tensor_type
        else:
            # a manual type skips the mix's rules, and with them its attn_v / ffn_down counters
            ty = _manual(t.name, patterns) if patterns else None
            if ty is None:
                ty = default if opts.pure else _impl(t, cat, default, ftype, model, opts, c)
            ty = fallback_type(t.n_per_row, ty)
        if ty not in TYPE_SIZES or t.n_per_row % TYPE_SIZES[ty][0]:
            raise Unsupported(f"type {type_name(ty)} for {t.name}")
        if not has_imatrix and requires_imatrix(t.name, ty):
            raise Unsupported(f"{type_name(ty)} for {t.name} needs an importance matrix")
        out.append(ty)
    return out
