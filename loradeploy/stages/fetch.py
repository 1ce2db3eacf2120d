"""Fetch stage: the adapter from the training box into the work folder, verified (``loradeploy.fetch``)."""
from __future__ import annotations

from typing import Any

from ..fetch import fetch_adapter, fetch_inputs
from ..state import Artifact
from .base import StageContext, StageResult


class FetchStage:
    name = "fetch"

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        return fetch_inputs(ctx.cfg, ctx.model_name, ctx.options.get("instance_id"))

    def run(self, ctx: StageContext) -> StageResult:
        got = fetch_adapter(ctx.cfg, ctx.model_name, ctx.paths.adapter, instance_id=ctx.options.get("instance_id"),
                            log=ctx.log, log_path=ctx.log_path, progress=ctx.progress)
        arts = [Artifact.of(path, "adapter", sha256=digest) for path, digest in got.files]
        if got.metadata is not None:
            arts.append(Artifact.of(got.metadata, "metadata"))
        return StageResult(arts, got.info)
