"""quantize: F16 GGUF -> every configured llama.cpp type, threads budgeted across formats."""
from __future__ import annotations

import concurrent.futures as cf
import re
import sys
from importlib import metadata
from pathlib import Path

from ..config import QUANT_TYPES
from ..errors import InputError, ProcError, QuantizeError
from ..fsutil import atomic_output
from ..resources import cpu_budget
from ..tools.proc import run
from .base import Artifact, StageContext, StageResult
from .convert import validate

_PROGRESS = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")


class _QError(QuantizeError, ProcError):
    pass


def llama_cpp_version() -> str:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        raise QuantizeError("llama-cpp-python is not installed", hint="run make setup") from None


def thread_plan(n_formats: int, budget: int, parallel: int = 0) -> tuple[int, int]:
    """(formats at once, threads each): never more busy threads than the budget."""
    if parallel <= 0:
        parallel = max(1, min(n_formats, budget // 4 or 1))
    parallel = max(1, min(parallel, n_formats, budget))
    return parallel, max(1, budget // parallel)


class QuantizeStage:
    name = "quantize"

    def _source(self, ctx: StageContext) -> Artifact:
        arts = ctx.upstream_artifacts("convert", "gguf")
        if not arts:
            raise InputError(f"model {ctx.model_name} has no converted GGUF", hint="run the convert stage first")
        return arts[0]

    def inputs(self, ctx: StageContext) -> dict:
        q = ctx.cfg.quantization
        return {"source": self._source(ctx).sha256, "formats": ctx.cfg.formats_for(ctx.model_name),
                "opts": [q.output_tensor_type, q.token_embedding_type, q.leave_output_tensor, q.pure,
                         q.allow_requantize, str(q.imatrix) if q.imatrix else None],
                "llama_cpp": llama_cpp_version()}

    def run(self, ctx: StageContext) -> StageResult:
        src_art = self._source(ctx)
        src = Path(src_art.path)
        if not src.is_file():
            raise InputError(f"converted GGUF {src} is missing", hint="re-run the convert stage")
        q = ctx.cfg.quantization
        if q.imatrix is not None:
            raise QuantizeError("quantization.imatrix needs llama.cpp's llama-quantize tool, which the embedded "
                                "quantizer cannot drive", hint="remove quantization.imatrix or the IQ formats")
        formats = ctx.cfg.formats_for(ctx.model_name)
        cores = cpu_budget(ctx.cfg.performance.max_cpu_threads)
        budget = min(q.threads, cores) if q.threads else cores
        parallel, threads = thread_plan(len(formats), budget, q.parallel_formats)
        ctx.log.info("quantizing %s to %s: %d at a time, %d threads each", src.name, formats, parallel, threads)
        done: dict[str, float] = {f: 0.0 for f in formats}

        def one(fmt: str) -> Artifact:
            out = ctx.paths.gguf(fmt)
            if out == src:  # the converted file already is this format
                return Artifact.of(out, "gguf", fmt, sha256=src_art.sha256)
            args = [sys.executable, "-m", "loradeploy.tools.llama_quantize", str(src), "OUT",
                    str(QUANT_TYPES[fmt]), "--nthread", str(threads)]
            if q.output_tensor_type:
                args += ["--output-tensor-type", q.output_tensor_type]
            if q.token_embedding_type:
                args += ["--token-embedding-type", q.token_embedding_type]
            for flag, on in (("--leave-output-tensor", q.leave_output_tensor), ("--pure", q.pure),
                             ("--allow-requantize", q.allow_requantize)):
                if on:
                    args.append(flag)

            def on_line(line: str) -> None:
                m = _PROGRESS.search(line)
                if m:
                    done[fmt] = int(m.group(1)) / max(1, int(m.group(2)))
                    ctx.progress(f"quantizing {', '.join(formats)}", sum(done.values()), len(formats))

            with atomic_output(out) as tmp:
                args[args.index("OUT")] = str(tmp)
                try:
                    run(args, log_path=ctx.log_path, what=f"quantize {fmt}", error_cls=_QError, on_line=on_line)
                except ProcError as exc:
                    raise QuantizeError(f"quantizing to {fmt} failed: {exc.message}", hint=f"see {ctx.log_path}") from None
                validate(tmp, ctx.log)
            done[fmt] = 1.0
            ctx.progress(f"quantizing {', '.join(formats)}", sum(done.values()), len(formats))
            return Artifact.of(out, "gguf", fmt)

        arts: dict[str, Artifact] = {}
        with cf.ThreadPoolExecutor(parallel) as pool:
            futs = {pool.submit(one, f): f for f in formats}
            errors = []
            for fut in cf.as_completed(futs):
                try:
                    arts[futs[fut]] = fut.result()
                except QuantizeError as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]
        ordered = [arts[f] for f in formats]
        return StageResult(ordered, {"formats": formats, "parallel": parallel, "threads_each": threads,
                                     "sizes": {a.format: a.size for a in ordered},
                                     "primary": ctx.cfg.serve_format_for(ctx.model_name)})
