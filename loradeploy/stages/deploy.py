"""deploy: the served-format GGUF -> a new version, live on every target in deployment.targets."""
from __future__ import annotations

from pathlib import Path

from ..deploy.service import deploy_file
from ..deploy.targets import check_targets
from ..deploy.versions import live_version
from ..errors import InputError, VerifyError
from .base import Artifact, RunRecord, StageContext, StageResult


def _pick(arts: list[Artifact], fmt: str) -> Artifact | None:
    return next((a for a in arts if (a.format or "").upper() == fmt), None)


class DeployStage:
    name = "deploy"

    def _find(self, ctx: StageContext, fmt: str) -> Artifact:
        art = _pick(ctx.upstream_artifacts("quantize", "gguf"), fmt) or _pick(ctx.upstream_artifacts("convert", "gguf"), fmt)
        if art is None:
            raise InputError(f"model {ctx.model_name} has no {fmt} GGUF to deploy",
                             hint="run the quantize stage (deployment.format must be one of the quantized formats)")
        return art

    def _lora(self, ctx: StageContext) -> Artifact | None:
        if ctx.cfg.mode_for(ctx.model_name) != "adapter":
            return None
        lora = next(iter(ctx.upstream_artifacts("convert", "lora")), None)
        if lora is None:
            raise InputError(f"model {ctx.model_name} is in adapter mode but has no LoRA GGUF",
                             hint="run the convert stage first (loradeploy run --model NAME)")
        return lora

    def _gate(self, ctx: StageContext) -> tuple[str, dict]:
        """The format to serve: the configured one, or what the verify gate chose when it ran.

        A blocked gate raises here, before anything is placed or switched: the live version serves on.
        """
        fmt = ctx.cfg.serve_format_for(ctx.model_name)
        rec = RunRecord(ctx.state_dir, ctx.model_name, {"stages": ctx.upstream})
        if "verify" not in ctx.cfg.pipeline.stages or not rec.finished("verify"):
            return fmt, {}
        info = rec.info("verify")
        gate = info.get("gate") or {}
        verified = (info.get("formats") or {}).get(fmt, {}).get("sha256")
        if gate.get("configured") != fmt or verified != self._find(ctx, fmt).sha256:
            raise InputError(f"the verify record of {ctx.model_name} is for other GGUFs than the {fmt} to deploy",
                             hint=f"run `loradeploy verify --model {ctx.model_name}` first")
        if not info.get("served_format"):
            live = live_version(ctx.cfg, ctx.model_name)
            keeps = f"; {live.version} ({live.format}) keeps serving" if live else "; nothing was deployed"
            raise VerifyError(f"{gate.get('reason') or 'verify blocked the deploy'}{keeps}",
                              hint=f"see {info.get('report')}")
        return info["served_format"], {"verdict": gate.get("verdict"), "served": info["served_format"],
                                       "reason": gate.get("reason") or ""}

    def inputs(self, ctx: StageContext) -> dict:
        cfg, m = ctx.cfg, ctx.model
        d = cfg.deployment
        llamacpp = d.llamacpp.model_dump(mode="json", exclude={"api_key"})
        llamacpp["api_key_set"] = d.llamacpp.api_key is not None  # a new key restarts nothing by itself
        fmt, gate = self._gate(ctx)
        lora = self._lora(ctx)
        inputs = {"gguf": self._find(ctx, fmt).sha256, "format": fmt,
                  **({"mode": "adapter", "lora": lora.sha256} if lora else {}),
                  "version": m.version, "port": m.port, "system_prompt": m.system_prompt,
                  "targets": list(d.targets), "models_dir": str(d.models_dir), "llamacpp": llamacpp}
        if gate:  # only with a verify record, so deploys without verify keep their inputs hash
            inputs["verify"] = gate
        if "lmstudio" in d.targets:
            inputs["lmstudio"] = [d.lmstudio.model_dump(mode="json"), m.publisher]
        if "ollama" in d.targets:
            inputs["ollama"] = d.ollama.model_dump(mode="json")
        return inputs

    def run(self, ctx: StageContext) -> StageResult:
        fmt, gate = self._gate(ctx)
        if gate.get("verdict") in ("warned", "fallback"):
            ctx.log.warning("verify: %s", gate["reason"])
        art, lora = self._find(ctx, fmt), self._lora(ctx)
        if lora is not None:  # adapter mode: the LoRA GGUF is the version, served on the shared base
            info = deploy_file(ctx.cfg, ctx.model_name, Path(lora.path), fmt=art.format, sha256=lora.sha256,
                               base=(Path(art.path), art.sha256), progress=ctx.progress, log=ctx.log)
        else:
            info = deploy_file(ctx.cfg, ctx.model_name, Path(art.path), fmt=art.format, sha256=art.sha256,
                               progress=ctx.progress, log=ctx.log)
        deployed = Artifact.of(Path(info["path"]), "deployment", art.format, sha256=info["sha256"])
        if gate:
            info["verify"] = gate
        return StageResult([deployed], info)

    def is_current(self, ctx: StageContext, record: dict) -> tuple[bool, str]:
        """A deploy is current only while its targets still serve the recorded bytes (a dead server
        makes a re-run restart it)."""
        sha = (record.get("info") or {}).get("sha256")
        if not sha:
            return False, "no deployed sha256 recorded"
        return check_targets(ctx.cfg, ctx.model_name, sha)
