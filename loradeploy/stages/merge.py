"""merge: base model + LoRA adapter -> a complete 16-bit HF folder (temporary unless kept).

On the fused path (stream strategy, a convert stage after it, no merge.save_merged_hf) the merge
happens inside convert, straight into the GGUF: this stage then only checks the inputs and records
``fused: true``, with no merged folder."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..fsutil import stat_fingerprint
from ..merge import FUSED, MergePlan, folder_digest, merge_folder, plan_merge, resolve_base
from ..merge.preflight import RunWrites
from ..tools import converter
from .base import Artifact, StageContext, StageResult


def adapter_dir_for(ctx: StageContext) -> Path:
    """The fetched adapter folder when fetch ran, else the configured local folder."""
    arts = ctx.upstream_artifacts("fetch", "adapter")
    if arts:
        return Path(arts[0].path).parent
    src = ctx.model.adapter_source
    if src.kind != "local":
        raise InputError(f"adapter {src.describe()} is remote and has not been fetched",
                         hint=f"run `loradeploy fetch --model {ctx.model_name}` or include the fetch stage")
    return Path(src.path)


def merge_inputs(ctx: StageContext) -> dict:
    """What the merged weights depend on: base and adapter content (fetch's digests, else file stats)
    and the merge settings, including those that choose the fused path. Convert hashes it too when
    it does the merging itself."""
    adir = adapter_dir_for(ctx)
    fetched = {a.path: a.sha256 for a in ctx.upstream_artifacts("fetch", "adapter")}
    m = ctx.cfg.merge
    sources = {"base": ctx.model.base_model, "base_files": stat_fingerprint(resolve_base(ctx.model.base_model)),
               "adapter": fetched or stat_fingerprint(adir)}
    if ctx.cfg.mode_for(ctx.model_name) == "adapter":  # nothing merged: the adapter and base as they are
        return {"mode": "adapter", **sources}
    return {**sources, "strategy": m.strategy, "dtype": m.dtype,
            "device": m.device, "save_merged_hf": m.save_merged_hf,
            "convert_follows": "convert" in ctx.cfg.pipeline.stages}


def run_writes(ctx: StageContext) -> RunWrites:
    """What the stages after the merge write, for the merge preflight's disk estimate."""
    cfg, q = ctx.cfg, ctx.cfg.quantization
    ev, stages = cfg.evaluation, cfg.pipeline.stages
    twins = ("Q4_K_M",) if q.imatrix and "Q4_K_M" in cfg.formats_for(ctx.model_name) else ()
    from ..verify.memory import token_budget
    setting = cfg.verify.max_tokens
    return RunWrites(q.convert_type, (lambda params: token_budget(setting, params)) if "verify" in stages else 0,
                     ev.base_gguf if "evaluate" in stages and ev.include_base and ev.base_gguf != "none" else None,
                     twins, int(cfg.performance.tensor_cache_gb * 2**30))


def plan_for(ctx: StageContext) -> MergePlan:
    return plan_merge(ctx.model.base_model, adapter_dir_for(ctx), merge=ctx.cfg.merge,
                      performance=ctx.cfg.performance, formats=ctx.cfg.formats_for(ctx.model_name),
                      work_dir=ctx.paths.work, log=ctx.log, stages=ctx.cfg.pipeline.stages, writes=run_writes(ctx),
                      preflight_child=not preflight_cache(ctx).is_file())


def plan_info(plan: MergePlan, memory: bool = True) -> dict:
    """``memory``: record the plan's estimate (not where this stage does none of that work)."""
    return {"strategy": plan.strategy, "path": plan.path, "fused": plan.path == FUSED, "base": str(plan.base.path),
            "adapter": str(plan.adapter.path), "params": plan.base.param_count,
            "architecture": plan.base.architecture, **(plan.memory.record() if plan.memory and memory else {})}


def preflight_cache(ctx: StageContext) -> Path:
    return ctx.state_dir / "converter_preflight.json"


class MergeStage:
    name = "merge"

    def inputs(self, ctx: StageContext) -> dict:
        return merge_inputs(ctx)

    def run(self, ctx: StageContext) -> StageResult:
        if ctx.cfg.mode_for(ctx.model_name) == "adapter":
            from ..lora import check_adapter
            lp = check_adapter(adapter_dir_for(ctx), resolve_base(ctx.model.base_model))
            ctx.log.info("adapter mode: nothing merged; the adapter (rank %d, scale %.4g%s) is applied at run time",
                         lp.rank, lp.scale, ", rsLoRA" if lp.use_rslora else "")
            return StageResult([], {"mode": "adapter", "fused": False, "rank": lp.rank, "alpha": lp.alpha,
                                    "use_rslora": lp.use_rslora, "scale": lp.scale,
                                    "target_modules": list(lp.target_modules)})
        plan = plan_for(ctx)
        base, adapter = plan.base, plan.adapter
        if plan.path == FUSED:
            ctx.log.info("fused path: convert merges %s + %s straight into the GGUF (no merged folder)",
                         base.path, adapter.path)
            return StageResult([], plan_info(plan, memory=False))
        out = ctx.paths.merged
        ctx.log.info("merging %s + %s with strategy %s (%d params)", base.path, adapter.path, plan.strategy,
                     base.param_count)
        pre = converter.preflight_beside(base.path, preflight_cache(ctx), log_path=ctx.log_path)
        digest, info = merge_folder(plan, out, ctx.cfg.merge, ctx.progress, preflight=pre)
        ctx.log.info("converter preflight: %s", pre.result())
        return StageResult([Artifact.of(out, "merged_hf", sha256=digest)], {**info, **plan_info(plan)})


__all__ = ["MergeStage", "adapter_dir_for", "folder_digest", "merge_inputs", "plan_for", "plan_info"]
