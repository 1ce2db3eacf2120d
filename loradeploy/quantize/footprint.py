"""What quantizing holds in memory, from the F16 GGUF's header: loradeploy's engine, llama.cpp's
llama-quantize children, and llama-imatrix (memory_estimate has the terms)."""
from __future__ import annotations

from pathlib import Path

from ..memory_estimate import Estimate, gguf_facts, llama_load, quantize_engine
from .engine import make_plan
from .rules import Options


def engine(src: Path, formats: list[str], threads: int, opts: Options = Options(), *, fresh: bool = False) -> Estimate:
    """The engine's one pass: per tensor its raw bytes and every distinct type it becomes."""
    plan = make_plan(src, formats, opts)
    per = []
    for i, t in enumerate(plan.order):
        types = {plan.types[f][i] for f in formats} - {t.ggml_type}
        per.append((t.nbytes(), sum(t.nbytes(ty) for ty in types)))
    return quantize_engine(per, threads, fresh=fresh)


def llama_quantize(src: Path, parallel: int) -> Estimate:
    """llama-quantize children, ``parallel`` at once: each maps the input (file pages, counted per
    child as RSS counts them) and holds the largest tensor in float32 twice (input, work buffer) plus
    its output."""
    g = gguf_facts(src)
    each = g.largest_elements * 4 * 2 + g.largest
    return Estimate("llama-quantize", parallel * (each + 32 * 2**20), parallel * g.size, 0,
                    {"float32 buffers": parallel * each, "mapped input": parallel * g.size})


def imatrix(src: Path, n_ctx: int, repack: bool) -> Estimate:
    """llama-imatrix over the F16 GGUF: a llama.cpp load (mmap'd) with an n_ctx context and batch."""
    return llama_load(gguf_facts(src), what="llama-imatrix", n_ctx=n_ctx, n_ubatch=n_ctx, repack=repack,
                      all_logits=True)
