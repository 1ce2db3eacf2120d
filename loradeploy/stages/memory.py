"""The heavy stages' memory, estimated from headers before they start (memory_estimate has the
terms): refused in one line when it does not fit, recorded beside the measured peak, and what the
Ray executor reserves. Also which tensors the adapter changed, for quantize's tensor cache."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ..memory_estimate import Estimate, convert, process_rss, require
from ..resources import memory_budget_bytes
from .base import StageContext


def budget(ctx: StageContext) -> int:
    return memory_budget_bytes(ctx.cfg.performance.max_memory_gb)


def folder_memory(ctx: StageContext, folder: Path) -> dict:
    """Refuse a conversion of ``folder`` that would not fit; its estimate for the record."""
    from ..merge import load_base_info
    from ..merge.preflight import tensor_facts
    est = convert(tensor_facts(load_base_info(folder)), fused=False)
    require(est, budget(ctx))
    return est.record()


def changed_tensors(gguf: Path, adapter) -> dict:
    """GGUF names of the tensors the merge changed (None: not known, nothing is cached)."""
    from ..quantize.reuse import adapter_tensors, changed_hf_names
    names = adapter_tensors(gguf, changed_hf_names(adapter.pairs, adapter.full_tensors)) if adapter.plain_lora \
        else None
    return {"adapter_tensors": names}


def quantize_estimate(ctx: StageContext, src: Path, threads: int, *, fresh: bool = False) -> Estimate:
    """The largest of what quantize runs one after another: llama-imatrix (quantization.imatrix: auto),
    the engine's pass over the formats it can do, llama-quantize for the rest."""
    from ..llamacpp import runtime
    from ..quantize import FORMATS, Options, footprint
    from ..quantize import imatrix as imx
    from ..resources import thread_plan
    q, formats = ctx.cfg.quantization, ctx.cfg.formats_for(ctx.model_name)
    base = 0 if fresh else process_rss()
    parts: list[Estimate] = []
    mine = [f for f in formats if f in FORMATS] if q.engine != "llama.cpp" else []
    if mine:
        try:
            parts.append(footprint.engine(src, mine, threads, Options.of_config(q), fresh=fresh))
        except ValueError:   # not an engine source (llama.cpp's quantizer takes it): its estimate below
            mine = []
    rest = [f for f in formats if f not in mine or (q.imatrix and imx.uses_imatrix(f))]
    if rest:
        parts.append(footprint.llama_quantize(src, thread_plan(len(rest), threads, q.parallel_formats)[0]))
    if q.imatrix == "auto":
        parts.append(footprint.imatrix(src, imx.MAX_CTX, runtime.decide().extra_bufts))
    parts = [dataclasses.replace(p, base=base) for p in parts] or [Estimate("quantize", 0, 0, base)]
    top = max(parts, key=lambda p: p.need)
    return dataclasses.replace(top, what="quantize" if top.what == "quantize" else f"quantize ({top.what})")


def quantize_memory(ctx: StageContext, src: Path, threads: int) -> dict:
    est = quantize_estimate(ctx, src, threads)
    require(est, budget(ctx))
    return est.record()


def estimate(ctx: StageContext, stage: str, threads: int = 1) -> Optional[Estimate]:
    """What a fresh worker (a Ray task) running ``stage`` for this model holds at its peak; None for the
    stages without an estimate here (verify's is its own)."""
    from ..merge import load_adapter_info, load_base_info, resolve_base
    from ..merge.preflight import FUSED, merge_memory, merge_path, resolve_strategy, tensor_facts
    from .merge import adapter_dir_for
    base = load_base_info(resolve_base(ctx.model.base_model))
    adapter = load_adapter_info(adapter_dir_for(ctx)) if stage in ("merge", "convert") else None
    if stage in ("merge", "convert") and ctx.cfg.mode_for(ctx.model_name) != "adapter":
        strategy = resolve_strategy(ctx.cfg.merge.strategy, adapter)
        path = merge_path(strategy, ctx.cfg.merge, ctx.cfg.pipeline.stages)
        # fused: the merge stage only checks, yet its preflight refuses what the fused convert will need,
        # so a worker reserves that much for it too (it is released as soon as the checks pass)
        if stage == "merge" or path == FUSED:
            return merge_memory(strategy, tensor_facts(base, adapter), path=path, fresh=True)
    if stage in ("merge", "convert"):
        return convert(tensor_facts(base), fused=False, fresh=True)
    if stage == "quantize":
        src = [Path(a.path) for a in ctx.upstream_artifacts("convert", "gguf") if Path(a.path).is_file()]
        if src:
            return quantize_estimate(ctx, src[0], threads, fresh=True)
        # before convert has run: the F16 file is the base's parameters in 16 bits
        f = tensor_facts(base)
        return Estimate("quantize", 3 * 2 * f.largest + 2 * f.largest + 64 * 2**20, 0, 0)
    return None
