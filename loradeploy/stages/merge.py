"""merge: base model + LoRA adapter -> a complete 16-bit HF folder (temporary unless kept)."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from ..errors import InputError, MergeError, StageUnavailable
from ..fsutil import atomic_output, sha256_file
from ..hfmodel import (AdapterInfo, BaseModelInfo, check_adapter_against_base, load_adapter_info,
                       load_base_info, resolve_base)
from ..resources import memory_budget_bytes, require_disk, require_memory
from ..tools import converter
from .base import Artifact, StageContext, StageResult

# bits per weight by format, for the disk estimate of the whole run
BPW = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q5_K_S": 5.5, "Q5_0": 5.5,
       "Q5_1": 6, "Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q4_0": 4.5, "Q4_1": 5, "Q3_K_L": 4.3, "Q3_K_M": 3.9,
       "Q3_K_S": 3.5, "Q2_K": 3.4}


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


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _resolve_strategy(choice: str, adapter: AdapterInfo) -> str:
    if choice == "auto":
        return "stream" if adapter.plain_lora else "peft"
    if choice == "stream" and not adapter.plain_lora:
        raise MergeError("merge.strategy stream handles plain LoRA only (this adapter uses "
                         f"{'DoRA' if adapter.config.get('use_dora') else 'extra weights'})",
                         hint="set merge.strategy: peft (or auto)")
    return choice


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

    # --- preflight -----------------------------------------------------------------------------
    def preflight(self, ctx: StageContext) -> tuple[BaseModelInfo, AdapterInfo, str, dict]:
        base_dir = resolve_base(ctx.model.base_model)
        base = load_base_info(base_dir)
        adir = adapter_dir_for(ctx)
        adapter = load_adapter_info(adir)
        for w in check_adapter_against_base(adapter, base, ctx.model.base_model,
                                            allow_mismatch=ctx.cfg.merge.allow_base_mismatch):
            ctx.log.warning(w)
        strategy = _resolve_strategy(ctx.cfg.merge.strategy, adapter)
        # disk: merged folder + F16 GGUF + every quant, all in work_dir
        params = base.param_count
        fmts = ctx.cfg.formats_for(ctx.model_name)
        need = params * 2 * 2 + sum(int(params * BPW.get(f, 8) / 8) for f in fmts)
        require_disk(ctx.paths.work, need, ctx.cfg.performance.min_free_disk_gb, "merge, convert and quantize")
        budget = memory_budget_bytes(ctx.cfg.performance.max_memory_gb)
        mem = base.largest_tensor_bytes * 4 + 256 * 1024 ** 2 if strategy == "stream" else int(params * 2 * 1.3)
        require_memory(mem, budget, f"the {strategy} merge")
        ctx.progress("converter preflight", 0, 0)
        conv = converter.cached_preflight(base_dir, ctx.state_dir / "converter_preflight.json",
                                          log_path=ctx.log_path)
        ctx.log.info("converter preflight: %s", conv)
        return base, adapter, strategy, conv

    def run(self, ctx: StageContext) -> StageResult:
        base, adapter, strategy, conv = self.preflight(ctx)
        out = ctx.paths.merged
        ctx.log.info("merging %s + %s with strategy %s (%d params)", base.path, adapter.path, strategy,
                     base.param_count)
        with atomic_output(out, is_dir=True) as tmp:
            if strategy == "stream":
                info = self._stream(ctx, base, adapter, tmp)
            elif strategy == "peft":
                info = self._peft(ctx, base, adapter, tmp)
            else:
                info = self._unsloth(ctx, base, adapter, tmp)
        digest = folder_digest(out)
        art = Artifact.of(out, "merged_hf", sha256=digest)
        info.update({"strategy": strategy, "base": str(base.path), "adapter": str(adapter.path),
                     "params": base.param_count, "architecture": base.architecture, **conv})
        return StageResult([art], info)

    # --- strategies ----------------------------------------------------------------------------
    def _dtype(self, ctx: StageContext, base: BaseModelInfo):
        from ..merge_stream import output_dtype
        return output_dtype(ctx.cfg.merge.dtype, base.dtype)

    def _stream(self, ctx, base, adapter, tmp: Path) -> dict:
        from ..merge_stream import copy_side_files, stream_merge
        dtype = self._dtype(ctx, base)
        info = stream_merge(base, adapter, tmp, dtype=dtype, progress=ctx.progress)
        copy_side_files(base.path, adapter.path, tmp, dtype)
        info["dtype"] = str(dtype).removeprefix("torch.")
        return info

    def _device(self, ctx) -> str:
        import torch
        want = ctx.cfg.merge.device
        if want == "cuda" and not torch.cuda.is_available():
            raise MergeError("merge.device is cuda but no CUDA GPU is visible", hint="set merge.device: auto or cpu")
        return "cuda" if want in ("auto", "cuda") and torch.cuda.is_available() else "cpu"

    def _peft(self, ctx, base, adapter, tmp: Path) -> dict:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from ..merge_stream import copy_side_files
        dtype = self._dtype(ctx, base)
        device = self._device(ctx)
        ctx.progress("loading base model", 0, 3)
        model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=dtype, low_cpu_mem_usage=True,
                                                     device_map=device,
                                                     trust_remote_code=ctx.cfg.merge.trust_remote_code)
        ctx.progress("applying adapter", 1, 3)
        model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
        model = model.merge_and_unload()
        ctx.progress("saving merged weights", 2, 3)
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=ctx.cfg.merge.max_shard_size)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        saved_cfg = (tmp / "config.json").read_text()
        copy_side_files(base.path, adapter.path, tmp, dtype)
        # keep the config transformers wrote (it matches the saved weights); side files add the tokenizer
        (tmp / "config.json").write_text(saved_cfg)
        ctx.progress("saved", 3, 3)
        return {"dtype": str(dtype).removeprefix("torch."), "device": device}

    def _unsloth(self, ctx, base, adapter, tmp: Path) -> dict:
        if importlib.util.find_spec("unsloth") is None:
            raise StageUnavailable("merge.strategy unsloth needs the unsloth package, which is not installed",
                                   hint="pip install unsloth (CUDA only), or set merge.strategy: auto")
        from unsloth import FastLanguageModel  # pragma: no cover - needs a CUDA box

        from ..merge_stream import copy_side_files
        dtype = self._dtype(ctx, base)
        model, tokenizer = FastLanguageModel.from_pretrained(str(adapter.path), dtype=dtype, load_in_4bit=False)
        model.save_pretrained_merged(str(tmp), tokenizer, save_method="merged_16bit")
        copy_side_files(base.path, adapter.path, tmp, dtype)
        return {"dtype": str(dtype).removeprefix("torch.")}


__all__ = ["MergeStage", "adapter_dir_for", "folder_digest"]
