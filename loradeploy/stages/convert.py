"""convert: -> F16 (or BF16/F32/Q8_0) GGUF with llama.cpp's official converter, used as a library.

Two paths, named in ``info.path``: fused (merge recorded ``fused: true``) merges base + adapter
straight into the GGUF, so its inputs are the merge's (adapter and base digests); two-step converts
the merged folder. Either way the GGUF is hashed while written, never read back."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConvertError, InputError
from ..fsutil import atomic_output
from ..merge import FUSED, TWO_STEP, fused_convert, load_adapter_info, resolve_base
from ..state import RunRecord
from ..tools import converter
from .base import Artifact, StageContext, StageResult
from .memory import changed_tensors, folder_memory
from .merge import adapter_dir_for, merge_inputs, plan_for, plan_info

ADAPTER = "adapter"  # adapter mode: no merge; the base and a LoRA GGUF


def validate(path: Path, log) -> dict:
    from ..gguf import check_gguf
    rep = check_gguf(path)
    for p in rep.problems:
        log.warning("gguf check %s: %s", path.name, p.message)
    return {"tensors": rep.tensor_count, "params": rep.parameter_count, "architecture": rep.architecture}


class ConvertStage:
    name = "convert"

    def _path(self, ctx: StageContext) -> str:
        """Which path the merge stage chose: its record says fused, or it left a merged folder
        (adapter mode: the base and the adapter are converted apart)."""
        if ctx.cfg.mode_for(ctx.model_name) == "adapter":
            return ADAPTER
        if RunRecord(ctx.state_dir, ctx.model_name, {"stages": ctx.upstream}).info("merge").get("fused"):
            return FUSED
        self._merged(ctx)
        return TWO_STEP

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
        path = self._path(ctx)
        src = {"merge": merge_inputs(ctx)} if path in (FUSED, ADAPTER) else {"merged": self._merged(ctx).sha256}
        if path == ADAPTER:
            from ..llamacpp.runtime import llama_cpp_version
            src["lora_converter"] = llama_cpp_version()  # convert_lora_to_gguf.py comes with llama-cpp-python
        return {"path": path, **src, "outtype": ctx.cfg.quantization.convert_type,
                "converter": converter.converter_version(), "base_gguf": self._base_type(ctx),
                "base": ctx.model.base_model if self._base_type(ctx) else None}

    def run(self, ctx: StageContext) -> StageResult:
        outtype = ctx.cfg.quantization.convert_type
        out = ctx.paths.gguf(outtype.upper())
        name = f"{ctx.model_name}-{ctx.model.version}"
        path = self._path(ctx)
        if path == ADAPTER:
            return self._adapter(ctx, outtype)
        if path == FUSED:
            plan = plan_for(ctx)
            ctx.progress(f"merging into {outtype.upper()}", 0, 0)
            # no vocab-only preflight here: in-process, the converter checks architecture and
            # tokenizer before the first tensor is merged (see merge/fused.py)
            with atomic_output(out) as tmp:
                merged = fused_convert(plan, tmp, ctx.cfg.merge, outtype=outtype, model_name=name,
                                       folder_name=ctx.paths.merged.name, log=ctx.log, progress=ctx.progress)
                info = {**plan_info(plan), **merged, **validate(tmp, ctx.log), **changed_tensors(tmp, plan.adapter)}
        else:
            merged_dir = Path(self._merged(ctx).path)
            if not (merged_dir / "config.json").is_file():
                raise ConvertError(f"merged folder {merged_dir} is missing or incomplete",
                                   hint="re-run the merge stage")
            memory = folder_memory(ctx, merged_dir)
            ctx.progress(f"converting to {outtype.upper()}", 0, 0)
            with atomic_output(out) as tmp:
                written = converter.write_gguf(merged_dir, tmp, outtype=outtype, model_name=name, log=ctx.log)
                info = {"path": TWO_STEP, **written, **validate(tmp, ctx.log), **memory,
                        **changed_tensors(tmp, load_adapter_info(adapter_dir_for(ctx)))}
        arts = [Artifact.of(out, "gguf", outtype.upper(), sha256=info.pop("sha256"))]
        base_type = self._base_type(ctx)
        if base_type:
            # the base without the adapter, for evaluation's reference row
            base_out = ctx.paths.gguf_dir / f"{ctx.model_name}_base-{base_type}.gguf"
            ctx.progress(f"converting the base model to {base_type.upper()}", 0, 0)
            with atomic_output(base_out) as tmp:
                written = converter.write_gguf(resolve_base(ctx.model.base_model), tmp, outtype=base_type,
                                               model_name=f"{ctx.model_name}-base", log=ctx.log)
                validate(tmp, ctx.log)
            arts.append(Artifact.of(base_out, "base_gguf", base_type.upper(), sha256=written["sha256"]))
            info["base_gguf"] = str(base_out)
        return StageResult(arts, info)

    def _adapter(self, ctx: StageContext, outtype: str) -> StageResult:
        """Adapter mode: the base once per base (shared by every adapter on it), and this model's
        adapter as a LoRA GGUF."""
        from ..lora import convert_adapter
        from ..lora.shared_base import once

        base_dir, out = resolve_base(ctx.model.base_model), ctx.paths.gguf(outtype.upper())

        def convert_base() -> StageResult:
            memory = folder_memory(ctx, base_dir)
            ctx.progress(f"converting the base model to {outtype.upper()} (once per base)", 0, 0)
            with atomic_output(out) as tmp:
                written = converter.write_gguf(base_dir, tmp, outtype=outtype, model_name=base_dir.name, log=ctx.log)
                info = {"path": ADAPTER, **written, **validate(tmp, ctx.log), **memory, "adapter_tensors": []}
            return StageResult([Artifact.of(out, "gguf", outtype.upper(), sha256=info.pop("sha256"))], info)

        inputs = {"base": merge_inputs(ctx)["base_files"], "outtype": outtype, "converter": converter.converter_version()}
        base = once(out.parent, "convert", inputs, ctx.model_name, convert_base, StageResult, ctx.log)
        info = dict(base.info)
        ctx.progress("converting the adapter to a LoRA GGUF", 0, 0)
        lora = convert_adapter(adapter_dir_for(ctx), base_dir, ctx.paths.lora, outtype="f16", log_path=ctx.log_path)
        arts = [*base.artifacts, Artifact.of(ctx.paths.lora, "lora", "F16", sha256=lora["sha256"])]
        if self._base_type(ctx):
            info["base_gguf"] = str(out)  # evaluation's base row: the very base the adapters run on
        return StageResult(arts, {**info, "path": ADAPTER, "mode": "adapter", "base_gguf_shared": str(out),
                                  "lora": {k: v for k, v in lora.items() if k != "sha256"}})
