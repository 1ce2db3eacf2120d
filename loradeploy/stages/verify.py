"""verify: every produced GGUF against the unmerged PEFT model -> verify.json and the gate's choice."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..fsutil import sha256_file
from ..merge import resolve_base
from ..resources import cpu_budget, memory_budget_bytes
from .base import Artifact, StageContext, StageResult
from .merge import adapter_dir_for

UNQUANTIZED = ("F32", "F16", "BF16")
CODE_VERSION = 2  # bump when what verify measures changes: old verdicts are redone


def _candidates(ctx: StageContext):
    from ..verify import Candidate

    want = ctx.cfg.verify.formats
    serve = ctx.cfg.serve_format_for(ctx.model_name)
    # by default the unquantized file (a proof of merge + convert) only while it is small beside the memory
    # budget: a 7B's 15 GB F16 would map 15 GB and take as long as the reference itself
    big = memory_budget_bytes(ctx.cfg.performance.max_memory_gb) // 4
    seen: dict[str, Artifact] = {}
    for stage in ("convert", "quantize"):
        for a in ctx.upstream_artifacts(stage, "gguf"):
            fmt = (a.format or "").upper()
            if want is None and fmt in UNQUANTIZED and fmt != serve and (a.size or 0) > big:
                ctx.log.info("verify leaves out the %s GGUF (%.1f GiB, over a quarter of the memory budget); "
                             "name it in verify.formats to verify it", fmt, (a.size or 0) / 2**30)
                continue
            if fmt and (want is None or fmt in want or fmt == serve):
                seen[fmt] = a
    if serve not in seen:
        raise InputError(f"model {ctx.model_name} has no {serve} GGUF to verify", hint="run the quantize stage first")
    lora = next(iter(ctx.upstream_artifacts("convert", "lora")), None)  # adapter mode
    lora_path = Path(lora.path) if lora is not None else None
    cands = [Candidate(f, f, Path(a.path), a.sha256, lora=lora_path) for f, a in seen.items()]
    for a in ctx.upstream_artifacts("convert", "base_gguf"):
        cands.append(Candidate("base", (a.format or "F16").upper(), Path(a.path), a.sha256, gated=False))
    return cands


def _digest(path: Path | None) -> str | None:
    return sha256_file(path) if path is not None and Path(path).is_file() else None


def _adapter_digest(ctx: StageContext) -> dict:
    fetched = {a.path: a.sha256 for a in ctx.upstream_artifacts("fetch", "adapter")}
    if fetched:
        return fetched
    adir = adapter_dir_for(ctx)
    return {p.name: sha256_file(p) for p in sorted(adir.iterdir()) if p.is_file()} if adir.is_dir() else {}


class VerifyStage:
    name = "verify"

    def inputs(self, ctx: StageContext) -> dict:
        from ..llamacpp.runtime import llama_cpp_version

        v = ctx.cfg.verify
        lora = [a.sha256 for a in ctx.upstream_artifacts("convert", "lora")]
        return {"ggufs": {c.label: c.sha256 for c in _candidates(ctx)}, "adapter": _adapter_digest(ctx),
                **({"lora": lora} if lora else {}),
                "base": ctx.model.base_model, "system_prompt": ctx.model.system_prompt,
                "calibration": _digest(v.calibration) if v.calibration else _digest(ctx.cfg.samples_for(ctx.model_name)),
                "verify": v.model_dump(mode="json"), "serve": ctx.cfg.serve_format_for(ctx.model_name),
                "version": ctx.model.version, "llama_cpp": llama_cpp_version(), "code": CODE_VERSION}

    def run(self, ctx: StageContext) -> StageResult:
        from ..verify import VerifyRequest, history_path, verify_dir, verify_model

        v = ctx.cfg.verify
        samples = ctx.cfg.samples_for(ctx.model_name)
        req = VerifyRequest(
            model=ctx.model_name, version=ctx.model.version, base_dir=resolve_base(ctx.model.base_model),
            adapter_dir=adapter_dir_for(ctx), candidates=_candidates(ctx),
            serve_label=ctx.cfg.serve_format_for(ctx.model_name), system_prompt=ctx.model.system_prompt,
            samples=samples if samples.is_file() else None, settings=v,
            out_dir=verify_dir(ctx.cfg.pipeline.work_dir, ctx.model_name),
            history=history_path(ctx.state_dir, ctx.model_name),
            threads=v.threads or cpu_budget(ctx.cfg.performance.max_cpu_threads),
            max_memory_gb=ctx.cfg.performance.max_memory_gb)
        data = verify_model(req, log=ctx.log, progress=ctx.progress)
        keys = ("kld_mean", "kld_p99", "top1", "rms_dp", "noise_to_signal", "passed", "sha256")
        info = {"formats": {k: {m: e.get(m) for m in keys} for k, e in data["formats"].items()},
                "signal": data["signal"], "template_ok": data["template_ok"], "stop_ok": data["stop_ok"],
                "served_format": data["served_format"], "gate": data["gate"], "report": data["path"],
                "n_positions": data["n_positions"], "seconds": data["seconds"]}
        return StageResult([Artifact.of(Path(data["path"]), "report")], info)
