"""deploy: the served-format GGUF -> a new version, live on every target in deployment.targets."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import InputError
from ..fsutil import sha256_file
from .base import Artifact, StageContext, StageResult

if TYPE_CHECKING:
    from ..config import Config

Progress = Callable[[str, float, float], None]


def deploy_file(cfg: "Config", model: str, gguf: Path, *, fmt: Optional[str] = None, sha256: Optional[str] = None,
                progress: Optional[Progress] = None, log=None) -> dict:
    """Validate, place as a version, switch every target, then back up what it replaced.

    The caller holds the model's lock (the pipeline's run lock, or deploy_model's own).
    """
    from ..gguf_check import check_gguf
    from ..targets import deploy_targets
    from ..versions import commit, discard, live_version, place, choose_id

    cfg.model(model)
    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(f"GGUF {gguf} does not exist", hint="run the quantize stage or pass an existing file")
    report = check_gguf(gguf)
    fmt = fmt or report.quant or report.file_type_name or "unknown"
    sha256 = sha256 or sha256_file(gguf)
    base_version = cfg.models[model].version
    version_id = choose_id(cfg, model, base_version, sha256)
    was_live = live_version(cfg, model)
    version = place(cfg, model, gguf, version=version_id, base_version=base_version, fmt=fmt, sha256=sha256)
    if log:
        log.info("deploying %s %s (%s, sha256 %s) to %s", model, version.version, fmt, sha256[:12],
                 ", ".join(cfg.deployment.targets))
    try:
        results = deploy_targets(cfg, model, version, progress=progress)
    except BaseException:
        if was_live is None or was_live.dir != version.dir:
            discard(cfg, version)
        raise
    info = commit(cfg, model, version)
    if log:
        log.info("%s %s is live; previous %s backed up to %s", model, version.version, info["previous"],
                 info["backup"])
    return {"model": model, "version": version.version, "format": fmt, "sha256": sha256,
            "path": str(version.path), "targets": results, **info}


def deploy_model(cfg: "Config", model: str, *, gguf: Path | str | None = None,
                 progress: Optional[Progress] = None) -> dict:
    """Library entry for `loradeploy deploy`: takes the model lock, then deploy_file."""
    from ..state import ModelLock

    cfg.model(model)
    with ModelLock(cfg.pipeline.state_dir, model, purpose="deploy"):
        if gguf is not None:
            return deploy_file(cfg, model, Path(gguf), progress=progress)
        art = _recorded_gguf(cfg, model)
        return deploy_file(cfg, model, Path(art.path), fmt=art.format, sha256=art.sha256 if art.intact() else None,
                           progress=progress)


def _pick(arts: list[Artifact], fmt: str) -> Artifact | None:
    return next((a for a in arts if (a.format or "").upper() == fmt), None)


def _recorded_gguf(cfg: "Config", model: str) -> Artifact:
    from ..state import load_record

    fmt = cfg.serve_format_for(model)
    stages = load_record(cfg.pipeline.state_dir, model)["stages"]
    for stage in ("quantize", "convert"):
        arts = [Artifact(**a) for a in (stages.get(stage) or {}).get("artifacts", []) if a.get("kind") == "gguf"]
        art = _pick(arts, fmt)
        if art is not None and Path(art.path).is_file():
            return art
    raise InputError(f"model {model} has no {fmt} GGUF from a quantize run",
                     hint=f"run `loradeploy run --model {model}` first, or pass --gguf FILE")


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
        inputs = {"gguf": self._source(ctx).sha256, "format": cfg.serve_format_for(ctx.model_name),
                  "version": m.version, "port": m.port, "system_prompt": m.system_prompt,
                  "targets": list(d.targets), "models_dir": str(d.models_dir),
                  "llamacpp": d.llamacpp.model_dump(mode="json")}
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
        from ..targets import check_targets

        sha = (record.get("info") or {}).get("sha256")
        if not sha:
            return False, "no deployed sha256 recorded"
        return check_targets(ctx.cfg, ctx.model_name, sha)
