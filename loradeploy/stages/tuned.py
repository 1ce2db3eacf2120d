"""The quantize stage's parts: the tuned formats (issue 20: each planned, its recipe written beside it,
quantized), the tensor cache, the calibration an importance matrix is computed from."""
from __future__ import annotations

from pathlib import Path

from ..quantize import ENGINE_VERSION, TensorCache, cache_dir
from ..quantize import imatrix as imx
from ..quantize.reuse import reusable
from ..quantize.tuned.build import CODE_VERSION as TUNED_CODE, build
from ..quantize.tuned.measure import TimeBudget
from ..quantize.tuned.scorer import MAX_TOKENS, Scorer, search_sequences
from .base import Artifact, StageContext
from .convert import validate
from .merge import adapter_dir_for

__all__ = ["TUNED_CODE", "build_tuned", "calibration_source", "engine_cache", "tuned_inputs"]


def calibration_source(ctx: StageContext) -> imx.CalibrationSource:
    """What verify calibrates with: an imatrix of that text keeps what the fine-tune uses most."""
    v, samples = ctx.cfg.verify, ctx.cfg.samples_for(ctx.model_name)
    return imx.CalibrationSource(ctx.model.base_model, adapter_dir_for(ctx), ctx.model.system_prompt,
                                 v.calibration, samples if samples.is_file() else None, v.max_tokens, v.max_seq_len)


def engine_cache(ctx: StageContext):
    """(the tensor cache, its folder, the tensors the adapter changed: None when unknown)."""
    root, changed = cache_dir(ctx.state_dir), ctx.upstream.get("convert", {}).get("info", {}).get("adapter_tensors")
    return TensorCache(root, int(ctx.cfg.performance.tensor_cache_gb * 2**30), ENGINE_VERSION), root, changed


def build_tuned(ctx: StageContext, src: Path, labels: list[str], imatrix, threads: int):
    """({label: GGUF artifact}, [recipe artifacts], {label: what the run record keeps}). Adapter mode tunes
    the shared base for every adapter on it (the cheap estimates without any one adapter's delta)."""
    cache, _, changed = engine_cache(ctx)
    adapter = None if ctx.paths.shared_base is not None else adapter_dir_for(ctx)
    arts, recipes, info = {}, [], {}
    scorer = None
    if ctx.cfg.quantization.tuned_measure:
        ctx.progress("tuned: reference logits (F16)", 0, 0)
        cal, more = calibration_source(ctx).build_with_more(4 * MAX_TOKENS)
        seqs, text = search_sequences(cal.sequences, more.sequences, cal.kinds, more.kinds)   # held out from verify's
        scorer = Scorer.of_gguf(src, seqs, threads, source=text)
    for f in labels:
        b = build(src, f, ctx.paths.gguf(f), imatrix=imatrix, adapter_dir=adapter, threads=threads,
                  engine=ctx.cfg.quantization.engine, cache=cache, reusable=reusable(changed), log_path=ctx.log_path,
                  progress=lambda d, t, f=f: ctx.progress(f"quantizing {f}", d, t), scorer=scorer,
                  budget=TimeBudget(ratio=ctx.cfg.quantization.tuned_search_ratio))
        validate(b.path, ctx.log)
        ctx.log.info("%s from %s: %s, %d bytes (at most %d), %s, %s; measured: %s", f, b.plan.recipe.base,
                     b.plan.recipe.counts(), b.plan.size, b.plan.limit, b.engine, b.seconds, b.measured)
        arts[f] = Artifact.of(b.path, "gguf", f, sha256=b.sha256)
        recipes.append(Artifact.of(b.recipe, "recipe", f))
        info[f] = {**b.info(), "tuned_for": "the base (adapter mode)" if adapter is None else "this adapter"}
    return arts, recipes, info


def tuned_inputs(ctx: StageContext) -> dict:
    """What the tuned formats add to the quantize stage's inputs hash."""
    from ..config.tuned import is_tuned

    if not any(map(is_tuned, ctx.cfg.formats_for(ctx.model_name))):
        return {}
    q = ctx.cfg.quantization
    return {"tuned": [TUNED_CODE, q.tuned_measure, q.tuned_search_ratio] +
            ([calibration_source(ctx).inputs()] if q.tuned_measure else [])}
