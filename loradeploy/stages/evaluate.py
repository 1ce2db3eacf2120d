"""evaluate: the model's deployed and quantized formats (and its base) on the sample set -> reports."""
from __future__ import annotations

from pathlib import Path

from ..errors import EvalError, InputError
from ..fsutil import sha256_file
from .base import Artifact, StageContext, StageResult


class EvaluateStage:
    name = "evaluate"

    def _out_dir(self, ctx: StageContext) -> Path:
        # one folder per model, so models run by the pipeline one after another keep their reports
        return Path(ctx.cfg.evaluation.output_dir) / ctx.model_name

    def inputs(self, ctx: StageContext) -> dict:
        samples = ctx.cfg.samples_for(ctx.model_name)
        if not samples.is_file():
            raise InputError(f"sample file {samples} not found", hint="set evaluation.samples")
        arts = {}
        for stage in ("quantize", "deploy"):
            for a in ctx.upstream_artifacts(stage):
                arts[f"{stage}:{a.kind}:{a.format or Path(a.path).name}"] = a.sha256 or f"{a.size}:{a.mtime_ns}"
        return {"samples": sha256_file(samples), "artifacts": arts,
                "evaluation": ctx.cfg.evaluation.model_dump(mode="json"),
                "server": ctx.cfg.deployment.llamacpp.model_dump(mode="json")}

    def run(self, ctx: StageContext) -> StageResult:
        from ..evaluation.runner import evaluate

        out_dir = self._out_dir(ctx)
        res = evaluate(ctx.cfg, [ctx.model_name], samples=ctx.cfg.samples_for(ctx.model_name), progress=ctx.progress,
                       output_dir=out_dir)
        for n in res.notes:
            ctx.log.info("note: %s", n)
        for t in res.targets:
            q = t.aggregates.get("quality", {}).get("quality")
            ctx.log.info("%s: %s, quality %s, errors %d/%d", t.target.label, t.status,
                         "–" if q is None else f"{q * 100:.1f}", t.aggregates.get("errors", 0),
                         t.aggregates.get("requests", 0))
            if t.error:
                ctx.log.warning("%s: %s", t.target.label, t.error)
        if not res.ok:
            raise EvalError(f"every evaluation target failed for {ctx.model_name}",
                            hint=f"see {res.reports.get('markdown', out_dir)}")
        paths = [Path(res.reports["json"]), Path(res.reports["markdown"])]
        paths += [Path(p) for p in res.reports.get("charts", {}).values()]
        info = {"report": res.reports["markdown"], "targets": len(res.targets), "errors": res.errors,
                "comparison": [{k: r[k] for k in ("label", "status", "quality", "delta_vs_best", "delta_vs_base",
                                                   "latency_p50_s", "gen_tokens_per_s")} for r in res.comparison]}
        down = res.failures()  # a target down or with failed requests: the run is not ok
        why = f"{len(down)} of {len(res.targets)} targets failed: {'; '.join(down)}" if down else None
        return StageResult([Artifact.of(p, "report") for p in paths], info, degraded=why)
