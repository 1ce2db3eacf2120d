"""Quantize one GGUF with the llama.cpp linked into llama-cpp-python (run as its own process).

A process per format: it can be killed cleanly, its llama.cpp log goes to quantize.log, and its
peak memory is measurable. Usage: python -m loradeploy.tools.llama_quantize SRC DST FTYPE [opts]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

from ..errors import ProcError, QuantizeError

GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10,
              "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20, "IQ4_XS": 23, "BF16": 30}


def command(src: str, dst: str, ftype: int, *, nthread: int, output_tensor_type: str | None = None,
            token_embedding_type: str | None = None, leave_output_tensor: bool = False, pure: bool = False,
            allow_requantize: bool = False) -> list[str]:
    """The argument list that runs this module on one format (for proc.run)."""
    args = [sys.executable, "-m", "loradeploy.tools.llama_quantize", src, dst, str(ftype), "--nthread", str(nthread)]
    if output_tensor_type:
        args += ["--output-tensor-type", output_tensor_type]
    if token_embedding_type:
        args += ["--token-embedding-type", token_embedding_type]
    for flag, on in (("--leave-output-tensor", leave_output_tensor), ("--pure", pure),
                     ("--allow-requantize", allow_requantize)):
        if on:
            args.append(flag)
    return args


_PROGRESS = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")


class _QError(QuantizeError, ProcError):
    pass


def run_quantize(src: str, dst: str, ftype: int, *, fmt: str, log_path: Path | None,
                 on_progress: Callable[[float], None] | None = None, **opts) -> None:
    """Quantize in a child process (see the module doc); ``on_progress`` gets the fraction done."""
    from .proc import run

    def on_line(line: str) -> None:
        m = _PROGRESS.search(line)
        if m and on_progress:
            on_progress(int(m.group(1)) / max(1, int(m.group(2))))

    try:
        run(command(src, dst, ftype, **opts), log_path=log_path, what=f"quantize {fmt}", error_cls=_QError,
            on_line=on_line)
    except ProcError as exc:
        raise QuantizeError(f"quantizing to {fmt} failed: {exc.message}", hint=f"see {log_path}") from None


def quantize(src: str, dst: str, ftype: int, *, nthread: int, output_tensor_type: str | None = None,
             token_embedding_type: str | None = None, leave_output_tensor: bool = False, pure: bool = False,
             allow_requantize: bool = False) -> int:
    import llama_cpp

    from ..llamacpp.runtime import ensure_in_process

    ensure_in_process()  # like every llama.cpp user here: the CPU mode is decided before first use
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = ftype
    params.allow_requantize = allow_requantize
    params.quantize_output_tensor = not leave_output_tensor
    params.pure = pure
    if output_tensor_type:
        params.output_tensor_type = GGML_TYPES[output_tensor_type]
    if token_embedding_type:
        params.token_embedding_type = GGML_TYPES[token_embedding_type]
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("ftype", type=int)
    ap.add_argument("--nthread", type=int, default=1)
    ap.add_argument("--output-tensor-type")
    ap.add_argument("--token-embedding-type")
    ap.add_argument("--leave-output-tensor", action="store_true")
    ap.add_argument("--pure", action="store_true")
    ap.add_argument("--allow-requantize", action="store_true")
    a = ap.parse_args(argv)
    rc = quantize(a.src, a.dst, a.ftype, nthread=a.nthread, output_tensor_type=a.output_tensor_type,
                  token_embedding_type=a.token_embedding_type, leave_output_tensor=a.leave_output_tensor,
                  pure=a.pure, allow_requantize=a.allow_requantize)
    if rc != 0:
        print(f"llama_model_quantize returned {rc}", file=sys.stderr)
    return 1 if rc != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
