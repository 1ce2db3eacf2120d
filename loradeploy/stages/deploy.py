"""deploy: the served-format GGUF -> a new version, live on every target in deployment.targets."""
from __future__ import annotations

from pathlib import Path

from ..deploy.service import deploy_file
from ..deploy.targets import check_targets
from ..errors import InputError
from .base import Artifact, StageContext, StageResult


def _pick(arts: list[Artifact], fmt: str) -> Artifact | None:
    return next((a for a in arts if (a.format or "").upper() == fmt), None)


class DeployStage:
    name = "deploy"

    def _source(self, ctx: StageContext) -> Artifact:
        fmt = ctx.cfg.serve_format_for(ctx.model_name)
        art = _pick(ctx.upstream_artifacts("quantize", "gguf"), fmt) or _pick(ctx.upstream_artifacts("convert", "gguf"), fmt)
        if art is None:
            raise InputError(f"model {ctx.model_name} has no {fmt} GGUF to deploy",
                             hint="run the quantize stage (deployment.format must be one of the quantized formats)")
        return art

    def inputs(self, ctx: StageContext) -> dict:
        cfg, m = ctx.cfg, ctx.model
        d = cfg.deployment
        llamacpp = d.llamacpp.model_dump(mode="json", exclude={"api_key"})
        llamacpp["api_key_set"] = d.llamacpp.api_key is not None  # a new key restarts nothing by itself
        inputs = {"gguf": self._source(ctx).sha256, "format": cfg.serve_format_for(ctx.model_name),
                  "version": m.version, "port": m.port, "system_prompt": m.system_prompt,
                  "targets": list(d.targets), "models_dir": str(d.models_dir), "llamacpp": llamacpp}
        if "lmstudio" in d.targets:
            inputs["lmstudio"] = [d.lmstudio.model_dump(mode="json"), m.publisher]
        if "ollama" in d.targets:
            inputs["ollama"] = d.ollama.model_dump(mode="json")
        return inputs

    def run(self, ctx: StageContext) -> StageResult:
        art = self._source(ctx)
        info = deploy_file(ctx.cfg, ctx.model_name, Path(art.path), fmt=art.format, sha256=art.sha256,
                           progress=ctx.progress, log=ctx.log)
        deployed = Artifact.of(Path(info["path"]), "deployment", art.format, sha256=info["sha256"])
        return StageResult([deployed], info)

    def is_current(self, ctx: StageContext, record: dict) -> tuple[bool, str]:
        """A deploy is current only while its targets still serve the recorded bytes (a dead server
        makes a re-run restart it)."""
        sha = (record.get("info") or {}).get("sha256")
        if not sha:
            return False, "no deployed sha256 recorded"
        return check_targets(ctx.cfg, ctx.model_name, sha)
