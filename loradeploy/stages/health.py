"""health: check the deployed model end to end; a failed check fails the run, a warning does not."""
from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from ..errors import HealthError
from ..fsutil import atomic_write_text
from ..health import DEGRADED, UNHEALTHY, EndpointLike, check_health
from .base import Artifact, StageContext, StageResult


def deployed_sha256(ctx: StageContext) -> Optional[str]:
    """sha256 of the GGUF the deploy stage served, else of the quantized file it would serve."""
    for art in ctx.upstream_artifacts("deploy"):
        if art.sha256 and (art.kind == "gguf" or str(art.path).endswith(".gguf")):
            return art.sha256
    for art in ctx.upstream_artifacts("deploy"):
        if art.sha256:
            return art.sha256
    fmt = ctx.cfg.serve_format_for(ctx.model_name)
    ggufs = ctx.upstream_artifacts("quantize", "gguf")
    for art in ggufs:
        if art.format == fmt:
            return art.sha256
    return ggufs[0].sha256 if ggufs else None


class HealthStage:
    name = "health"

    def __init__(self, endpoints: Optional[Sequence[EndpointLike]] = None):
        # None: ask serving.endpoints(); a list: check exactly these (tests, the deploy switch).
        self.endpoints = endpoints

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        return {"gguf_sha256": deployed_sha256(ctx),
                "health_check": ctx.cfg.health_check.model_dump(mode="json")}

    def is_current(self, ctx: StageContext, record: dict) -> tuple[bool, str]:
        # The server can die or slow down at any time: a past pass proves nothing now.
        return False, "health is always re-checked"

    def run(self, ctx: StageContext) -> StageResult:
        hc = ctx.cfg.health_check
        if not hc.enabled:
            ctx.log.info("health checks are disabled (health_check.enabled: false)")
            return StageResult([], {"status": "disabled"})
        ctx.progress(f"checking {ctx.model_name}", 0, 0)
        report = check_health(ctx.cfg, [ctx.model_name], endpoints=self.endpoints)
        path = ctx.paths.work / "health.json"
        atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
        for key, model in report.models.items():
            for c in model.checks:
                ctx.log.info("%s %s: %s: %s", key, c.name, c.status, c.detail)
        for c in report.system:
            ctx.log.info("system %s: %s: %s", c.name, c.status, c.detail)
        status = report.status
        if status == UNHEALTHY:
            failures = report.failures()
            listed = "; ".join(f"{c.name}: {c.detail}" for _, c in failures[:3])
            remedy = next((c.remedy for _, c in failures if c.remedy), None)
            raise HealthError(f"{ctx.model_name} is unhealthy: {listed}",
                              hint=(remedy + f"; full report: {path}") if remedy else f"full report: {path}")
        if status == DEGRADED:
            for key, c in report.warnings():
                ctx.log.warning("%s degraded: %s: %s (%s)", key, c.name, c.detail, c.remedy)
        model = report.models.get(ctx.model_name)
        info = {"status": status, "metrics": model.metrics if model else {},
                "warnings": [f"{c.name}: {c.detail}" for _, c in report.warnings()], "report": str(path)}
        why = "; ".join(info["warnings"])[:300] or "degraded" if status == DEGRADED else None
        return StageResult([Artifact.of(path, "report", hash_file=False)], info, degraded=why)
