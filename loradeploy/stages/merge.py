"""merge: base model + LoRA adapter -> a complete 16-bit HF folder (temporary unless kept)."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..merge import folder_digest, merge_folder, plan_merge
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


class MergeStage:
    name = "merge"

    def inputs(self, ctx: StageContext) -> dict:
        adir = adapter_dir_for(ctx)
        fetched = {a.path: a.sha256 for a in ctx.upstream_artifacts("fetch", "adapter")}
        if not fetched and adir.is_dir():
            fetched = {str(p): f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(adir.iterdir())
                       if p.is_file()}
        m = ctx.cfg.merge
        return {"base": ctx.model.base_model, "adapter": fetched, "strategy": m.strategy, "dtype": m.dtype,
                "device": m.device}

    def run(self, ctx: StageContext) -> StageResult:
        plan = plan_merge(ctx.model.base_model, adapter_dir_for(ctx), merge=ctx.cfg.merge,
                          performance=ctx.cfg.performance, formats=ctx.cfg.formats_for(ctx.model_name),
                          work_dir=ctx.paths.work, converter_cache=ctx.state_dir / "converter_preflight.json",
                          log_path=ctx.log_path, log=ctx.log, progress=ctx.progress)
        base, adapter = plan.base, plan.adapter
        out = ctx.paths.merged
        ctx.log.info("merging %s + %s with strategy %s (%d params)", base.path, adapter.path, plan.strategy,
                     base.param_count)
        digest, info = merge_folder(plan, out, ctx.cfg.merge, ctx.progress)
        art = Artifact.of(out, "merged_hf", sha256=digest)
        info.update({"strategy": plan.strategy, "base": str(base.path), "adapter": str(adapter.path),
                     "params": base.param_count, "architecture": base.architecture, **plan.converter})
        return StageResult([art], info)


__all__ = ["MergeStage", "adapter_dir_for", "folder_digest"]
