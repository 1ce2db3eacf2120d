"""convert: merged HF folder -> F16 (or BF16/F32/Q8_0) GGUF with llama.cpp's official converter."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConvertError, InputError
from ..fsutil import atomic_output
from ..merge import resolve_base
from ..tools import converter
from .base import Artifact, StageContext, StageResult


def validate(path: Path, log) -> dict:
    from ..gguf import check_gguf
    rep = check_gguf(path)
    for p in rep.problems:
        log.warning("gguf check %s: %s", path.name, p.message)
    return {"tensors": rep.tensor_count, "params": rep.parameter_count, "architecture": rep.architecture}


class ConvertStage:
    name = "convert"

    def _merged(self, ctx: StageContext) -> Artifact:
        arts = ctx.upstream_artifacts("merge", "merged_hf")
        if not arts:
            raise InputError(f"model {ctx.model_name} has no merged folder",
                             hint="run the merge stage first (loradeploy run --model NAME)")
        return arts[0]

    def _base_type(self, ctx: StageContext) -> str | None:
        ev = ctx.cfg.evaluation
        if "evaluate" in ctx.cfg.pipeline.stages and ev.include_base and ev.base_gguf != "none":
            return ev.base_gguf
        return None

    def inputs(self, ctx: StageContext) -> dict:
        return {"merged": self._merged(ctx).sha256, "outtype": ctx.cfg.quantization.convert_type,
                "converter": converter.converter_version(), "base_gguf": self._base_type(ctx),
                "base": ctx.model.base_model if self._base_type(ctx) else None}

    def run(self, ctx: StageContext) -> StageResult:
        merged = Path(self._merged(ctx).path)
        if not (merged / "config.json").is_file():
            raise ConvertError(f"merged folder {merged} is missing or incomplete", hint="re-run the merge stage")
        outtype = ctx.cfg.quantization.convert_type
        out = ctx.paths.gguf(outtype.upper())
        ctx.progress(f"converting to {outtype.upper()}", 0, 0)
        with atomic_output(out) as tmp:
            converter.convert(merged, tmp, outtype=outtype, log_path=ctx.log_path,
                              model_name=f"{ctx.model_name}-{ctx.model.version}")
            info = validate(tmp, ctx.log)
        arts = [Artifact.of(out, "gguf", outtype.upper())]
        base_type = self._base_type(ctx)
        if base_type:
            # the base without the adapter, for evaluation's reference row
            base_out = ctx.paths.gguf_dir / f"{ctx.model_name}_base-{base_type}.gguf"
            ctx.progress(f"converting the base model to {base_type.upper()}", 0, 0)
            with atomic_output(base_out) as tmp:
                converter.convert(resolve_base(ctx.model.base_model), tmp, outtype=base_type,
                                  log_path=ctx.log_path, model_name=f"{ctx.model_name}-base")
                validate(tmp, ctx.log)
            arts.append(Artifact.of(base_out, "base_gguf", base_type.upper()))
            info["base_gguf"] = str(base_out)
        return StageResult(arts, info)
