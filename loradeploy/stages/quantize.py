"""quantize: F16 GGUF -> every configured type; loradeploy's engine where it applies, llama.cpp's otherwise."""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
from pathlib import Path

from ..config.tuned import is_tuned
from ..errors import InputError, QuantizeError
from ..fsutil import atomic_output
from ..llamacpp import runtime
from ..lora.shared_base import once
from ..quantize import ENGINE_VERSION, FORMATS, Options, quantize_formats, why_unsupported
from ..quantize import imatrix as imx
from ..quantize.cache import trim
from ..quantize.reuse import reusable
from ..resources import cpu_budget, thread_plan
from .base import Artifact, StageContext, StageResult
from .convert import validate
from .memory import quantize_memory
from .tuned import build_tuned, calibration_source, engine_cache, tuned_inputs


class QuantizeStage:
    name = "quantize"

    def _source(self, ctx: StageContext) -> Artifact:
        arts = ctx.upstream_artifacts("convert", "gguf")
        if not arts:
            raise InputError(f"model {ctx.model_name} has no converted GGUF", hint="run the convert stage first")
        return arts[0]

    def inputs(self, ctx: StageContext) -> dict:
        # quantization.engine is left out on purpose: both paths write the same bytes
        q = ctx.cfg.quantization
        return {"source": self._source(ctx).sha256, "formats": ctx.cfg.formats_for(ctx.model_name),
                "opts": [q.output_tensor_type, q.token_embedding_type, q.leave_output_tensor, q.pure,
                         q.allow_requantize], "llama_cpp": runtime.llama_cpp_version(),
                "imatrix": imx.setting_inputs(q.imatrix, calibration_source(ctx)),
                **tuned_inputs(ctx)}

    def _split(self, ctx: StageContext, src: Path, formats: list[str], imatrix) -> tuple[list[str], str | None]:
        """(formats for loradeploy's engine, why the others are not)."""
        q = ctx.cfg.quantization
        if q.engine == "llama.cpp":
            return [], "quantization.engine is llama.cpp"
        mine = [f for f in formats if f in FORMATS and ctx.paths.gguf(f) != src
                and not (imatrix and imx.uses_imatrix(f))]  # the engine is ggml's bytes without an imatrix only
        other = [f for f in formats if f not in mine and ctx.paths.gguf(f) != src]
        reason = why_unsupported(src, mine, Options.of_config(q)) if mine else None
        if q.engine == "loradeploy" and (reason or other):
            raise QuantizeError(f"quantization.engine is loradeploy, but it cannot do {reason or ', '.join(other)}"
                                + (" (with an importance matrix)" if imatrix else ""),
                                hint="set quantization.engine: auto to let llama.cpp's quantizer do it")
        if reason:
            ctx.log.info("llama.cpp quantizes every format: %s", reason)
            return [], reason
        return mine, ("not an engine format: " + ", ".join(other)) if other else None

    def _engine(self, ctx: StageContext, src: Path, fmts: list[str], threads: int) -> tuple[dict, dict]:
        q = ctx.cfg.quantization
        cache, root, changed = engine_cache(ctx)
        ctx.log.info("loradeploy engine: %s from %s, %d threads; cache: %s", fmts, src.name, threads, "off (changed "
                     "tensors unknown)" if changed is None else f"all but the {len(changed)} tensors the adapter changed")
        try:
            with contextlib.ExitStack() as stack:
                tmps = {f: stack.enter_context(atomic_output(ctx.paths.gguf(f))) for f in fmts}
                res = quantize_formats(src, tmps, opts=Options.of_config(q), threads=threads, cache=cache,
                                       progress=lambda d, t: ctx.progress(f"quantizing {', '.join(fmts)}", d, t),
                                       reusable=reusable(changed))
                for f in fmts:
                    validate(tmps[f], ctx.log)
        except (ValueError, RuntimeError) as exc:  # the engine's own failure: llama.cpp's quantizer remains
            if q.engine == "loradeploy":
                raise QuantizeError(f"loradeploy's quantize engine failed: {exc}") from None
            ctx.log.warning("loradeploy engine failed (%s); llama.cpp quantizes instead", exc)
            return {}, {"failed": str(exc)}
        if cache.enabled:
            res.stats["cache_trim"] = trim(root, cache.limit, ENGINE_VERSION)
        ctx.log.info("loradeploy engine: %s", res.stats)
        arts = {f: Artifact.of(ctx.paths.gguf(f), "gguf", f, sha256=res.outputs[f].sha256) for f in fmts}
        return arts, res.stats

    def _llama(self, ctx: StageContext, src: Path, fmt: str, dst: Path, imatrix, threads: int, done: dict) -> Artifact:
        q, key = ctx.cfg.quantization, fmt if dst == ctx.paths.gguf(fmt) else f"{fmt} (no imatrix)"

        def on_progress(frac: float) -> None:
            done[key] = frac
            ctx.progress(f"quantizing {', '.join(done)}", sum(done.values()), len(done))

        imx.run_job(src, fmt, dst, imatrix, threads=threads, log_path=ctx.log_path, on_progress=on_progress,
                    plain_binary=key != fmt, output_tensor_type=q.output_tensor_type,
                    token_embedding_type=q.token_embedding_type, leave_output_tensor=q.leave_output_tensor,
                    pure=q.pure, allow_requantize=q.allow_requantize)
        validate(dst, ctx.log)
        done[key] = 1.0
        return Artifact.of(dst, "gguf" if key == fmt else "gguf_twin", fmt)

    def run(self, ctx: StageContext) -> StageResult:
        if ctx.paths.shared_base is None:
            return self._run(ctx)
        inputs = {k: v for k, v in self.inputs(ctx).items() if k != "imatrix"}  # adapter mode: once per base
        return once(ctx.paths.shared_base, "quantize", inputs, ctx.model_name, lambda: self._run(ctx), StageResult, ctx.log)

    def _run(self, ctx: StageContext) -> StageResult:
        src_art = self._source(ctx)
        src = Path(src_art.path)
        if not src.is_file():
            raise InputError(f"converted GGUF {src} is missing", hint="re-run the convert stage")
        q, formats = ctx.cfg.quantization, ctx.cfg.formats_for(ctx.model_name)
        cores = cpu_budget(ctx.cfg.performance.max_cpu_threads)
        budget = min(q.threads, cores) if q.threads else cores
        memory = quantize_memory(ctx, src, budget)  # refused here, before anything is written
        imatrix, note = imx.resolve(q.imatrix, src, src_art.sha256, calibration_source(ctx),
                                    ctx.paths.gguf_dir / "imatrix", threads=budget, log_path=ctx.log_path)
        ctx.log.info("%s", note or "no importance matrix")
        tuned = [f for f in formats if is_tuned(f)]
        mine, why_not = self._split(ctx, src, [f for f in formats if f not in tuned], imatrix)
        arts, stats = self._engine(ctx, src, mine, budget) if mine else ({}, None)
        ours = set(arts)
        made, recipes, tuned_info = build_tuned(ctx, src, tuned, imatrix, budget) if tuned else ({}, [], {})
        arts.update(made)
        # the converted file already is this format
        arts.update({f: Artifact.of(src, "gguf", f, sha256=src_art.sha256) for f in formats if ctx.paths.gguf(f) == src})
        jobs = imx.plan(formats, ctx.paths.gguf, imatrix, set(arts))
        parallel, threads = thread_plan(len(jobs), budget, q.parallel_formats) if jobs else (0, 0)
        results: list[Artifact] = []
        if jobs:
            ctx.log.info("llama.cpp quantizes %s: %d at a time, %d threads each",
                         [f"{f}{'+imatrix' if im else ''} -> {d.name}" for f, d, im in jobs], parallel, threads)
            done: dict[str, float] = {}
            with cf.ThreadPoolExecutor(parallel) as pool:
                futs = [pool.submit(self._llama, ctx, src, f, dst, im, threads, done) for f, dst, im in jobs]
            errors = [fut.exception() for fut in futs if fut.exception() is not None]
            if errors:
                raise errors[0]
            results = [fut.result() for fut in futs]
        arts.update({a.format: a for a in results if a.kind == "gguf"})
        ordered = [arts[f] for f in formats] + [a for a in results if a.kind != "gguf"] + \
            recipes + ([Artifact.of(imatrix, "imatrix")] if imatrix else [])
        engine = {f: tuned_info[f]["engine"] + "-tuned" if f in tuned_info else "loradeploy" if f in ours
                  else "llama.cpp-imatrix" if imatrix and imx.uses_imatrix(f) else "llama.cpp" for f in formats}
        return StageResult(ordered, {"formats": formats, "parallel": parallel, "threads_each": threads,
                                     "engine": engine, "engine_note": why_not, "engine_stats": stats,
                                     "sizes": {a.format: a.size for a in ordered if a.kind == "gguf"},
                                     "imatrix": str(imatrix) if imatrix else None, "tuned": tuned_info,
                                     "primary": ctx.cfg.serve_format_for(ctx.model_name), **memory})
