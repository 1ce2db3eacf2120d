"""Before verify loads anything: the token budget, how the reference runs, and the peak memory of
both halves (the reference, then one GGUF at a time), from headers only. A run that does not fit is
refused in one line that says what it needs, what is free and which key to change.

Two kinds of memory are kept apart: anonymous memory (what must fit) and the GGUF's file pages that
llama.cpp maps (counted in RSS, but clean and reclaimable: the kernel drops them under pressure).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

from ..errors import ResourceError
from ..merge.hf_folder import BaseModelInfo
from ..resources import GIB, memory_budget_bytes
from ..tools.safetensors_io import DTYPE_BYTES, numel
from .metrics import LOGSOFTMAX_ROWS
from .metrics import ROWS_PER_CHUNK as STATS_ROWS

AUTO_TOKENS_MAX, AUTO_TOKENS_MIN = 2048, 256
# tokens x parameters the auto budget allows: the float32 reference costs ~4 FLOP per parameter per token
# (adapter on and off), ~60-120 GFLOP/s on 2 cores: 2048 tokens up to 1.5B (2.5 min), 512 at 7.6B (2-4 min)
AUTO_TOKEN_PARAMS = 3.9e12
RUNTIME = 420 * 2**20            # a process with torch + transformers + a tokenizer loaded (Linux, measured), when
MODULES = 64 * 2**20             # there is no process to measure; the model classes imported later add this
LLAMA_RUNTIME = 60 * 2**20       # llama.cpp's library and compute buffers beyond the ones counted below


def token_budget(setting, params: int) -> int:
    """verify.max_tokens: the number given, or auto by parameter count."""
    if setting != "auto":
        return int(setting)
    n = int(AUTO_TOKEN_PARAMS / max(1, params)) // 64 * 64
    return max(AUTO_TOKENS_MIN, min(AUTO_TOKENS_MAX, n))


@dataclass
class Estimate:
    what: str
    anon: int                          # bytes of anonymous memory at the peak
    file: int = 0                      # mapped file pages at the peak (reclaimable)
    parts: dict = field(default_factory=dict)

    @property
    def rss(self) -> int:
        return self.anon + self.file

    def to_dict(self) -> dict:
        return {"what": self.what, "anon_bytes": self.anon, "file_bytes": self.file, "rss_bytes": self.rss,
                "parts": self.parts}


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of the calibration set."""

    n_tokens: int
    n_positions: int
    longest: int
    sum_sq: int                        # sum of each sequence's length squared (masks)


def _layer_bytes(base: BaseModelInfo) -> tuple[int, int]:
    """(largest decoder layer in float32, largest tensor of a layer at its stored width: its read buffer)."""
    layers: dict[str, int] = {}
    biggest = 0
    for name, (_, info) in base.tensors.items():
        n = numel(info["shape"])
        parts = name.split(".")
        if "layers" in parts:
            key = ".".join(parts[:parts.index("layers") + 2])
            layers[key] = layers.get(key, 0) + n * 4
            biggest = max(biggest, n * DTYPE_BYTES.get(info["dtype"], 2))
    return max(layers.values(), default=0), biggest


def _head_phase(vocab: int, hidden: int, rows: int) -> int:
    from .streamed import HEAD_BLOCK_BYTES, HEAD_CHUNK_BYTES

    chunk = HEAD_CHUNK_BYTES * 3 // 2                      # float32 chunk + its 16-bit read buffer
    # the writer: the block's float32 log-probs, float64 log-softmax rows (in and out), the statistics'
    # float64 temporaries (reference, candidate, p, exp, a difference, ...)
    writer = rows * vocab * 4 + 2 * LOGSOFTMAX_ROWS * vocab * 8 + 6 * STATS_ROWS * vocab * 8
    return 2 * rows * vocab * 4 + chunk + writer


def baseline() -> int:
    """This process's RSS now, plus the modules the reference imports later."""
    return psutil.Process().memory_info().rss + MODULES


def reference_estimate(base: BaseModelInfo, shape: Shape, mode: str, vocab: int, runtime: int = RUNTIME) -> Estimate:
    from .streamed import head_rows

    c = base.config
    hidden = int(c.get("hidden_size", 0))
    inter = int(c.get("intermediate_size", 4 * hidden))
    heads = int(c.get("num_attention_heads", 1))
    act = shape.longest * (3 * inter + 8 * hidden) * 4 + 2 * heads * shape.longest ** 2 * 4
    if mode == "streamed":
        layer, biggest = _layer_bytes(base)
        streams = 2 * shape.n_tokens * hidden * 4 + shape.sum_sq * 4
        layer_phase = layer + biggest + streams + act
        head_phase = 2 * shape.n_positions * hidden * 4 + shape.n_tokens * hidden * 4 + \
            _head_phase(vocab, hidden, min(shape.n_positions, head_rows(vocab)))
        parts = {"layer_f32": layer, "hidden_states": streams, "activations": act,
                 "head_phase": head_phase}
        return Estimate("the streamed reference", runtime + max(layer_phase, head_phase), 0, parts)
    weights = base.param_count * 4
    logits = 3 * shape.longest * vocab * 4 + _head_phase(vocab, hidden, shape.longest)
    parts = {"weights_f32": weights, "activations": act, "logits": logits}
    return Estimate("the in-memory reference", runtime + weights + act + logits, 0, parts)


def candidate_estimate(path: Path, n_ctx: int, vocab: int, config: dict, *, extra_bufts: bool,
                       lora: Optional[Path] = None, runtime: int = RUNTIME) -> Estimate:
    """One GGUF in llama.cpp: its file mapped, repacked copies (extra buffer types) anonymous, the
    logits of every position twice (llama.cpp's buffer and llama-cpp-python's scores), the KV cache."""
    size = Path(path).stat().st_size
    layers = int(config.get("num_hidden_layers", 1))
    heads = int(config.get("num_attention_heads", 1))
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size", heads)) // heads)
    kv = n_ctx * layers * 2 * int(config.get("num_key_value_heads", heads)) * head_dim * 2
    logits = 2 * n_ctx * vocab * 4
    scoring = n_ctx * vocab * 4 + 6 * STATS_ROWS * vocab * 8
    repacked = size if extra_bufts else 0
    adapter = Path(lora).stat().st_size if lora else 0
    parts = {"gguf_file_pages": size, "repacked": repacked, "kv_cache": kv, "logits": logits, "scoring": scoring}
    return Estimate(f"llama.cpp on {Path(path).name}", runtime + LLAMA_RUNTIME + repacked + kv + logits +
                    scoring + adapter, size + adapter, parts)


def plan_reference(setting: str, device: str, model_type: str, cuda: bool) -> str:
    """streamed | memory, before the budget check (which may still refuse either)."""
    from .streamed import supported

    if setting != "auto":
        return setting
    if cuda and device != "cpu":
        return "memory"
    return "streamed" if supported(model_type) else "memory"


def head_vocab(base: BaseModelInfo) -> int:
    """Rows of the output head (the tied embedding when there is no lm_head)."""
    head = "lm_head.weight" if "lm_head.weight" in base.tensors and not base.config.get("tie_word_embeddings") \
        else "model.embed_tokens.weight"
    return int(base.tensors[head][1]["shape"][0]) if head in base.tensors else int(base.config.get("vocab_size", 0))


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def check_fits(estimates: list[Estimate], max_memory_gb: Optional[float], *, hint_keys: str) -> None:
    """Refuse, in one line, the first estimate whose anonymous memory exceeds what is free or the budget."""
    budget = memory_budget_bytes(max_memory_gb)
    free = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    limit = min(budget, free)
    for e in estimates:
        if e.anon > limit:
            biggest = max(e.parts, key=e.parts.get) if e.parts else "?"
            raise ResourceError(
                f"not enough memory for {e.what}: needs about {_gib(e.anon)} (largest part {biggest} "
                f"{_gib(e.parts.get(biggest, 0))}), {_gib(free)} free, budget {_gib(budget)}",
                hint=f"raise performance.max_memory_gb or free memory; {hint_keys}")


def stage_peak(base_dir: Path, ggufs: list[Path], settings, *, cuda: bool = False) -> int:
    """Verify's peak anonymous memory from headers and settings alone (no tokenizer): for a scheduler
    that reserves memory before the stage runs (the Ray executor). Worst case of the calibration: every
    sequence ``max_seq_len`` long, the token budget full; llama.cpp in its repacking CPU mode."""
    from ..merge.hf_folder import load_base_info

    base = load_base_info(Path(base_dir))
    tokens = token_budget(settings.max_tokens, base.param_count)
    seq = min(int(settings.max_seq_len), tokens)
    shape = Shape(tokens, tokens, seq, tokens * seq)
    vocab = head_vocab(base)
    mode = plan_reference(settings.reference, settings.device, str(base.config.get("model_type", "?")), cuda)
    n_ctx = max(64, -(-seq // 32) * 32)
    peaks = [reference_estimate(base, shape, mode, vocab).anon]
    peaks += [candidate_estimate(p, n_ctx, vocab, base.config, extra_bufts=True).anon for p in ggufs if Path(p).is_file()]
    return max(peaks)
