"""Importance matrices from the fine-tune's own data, and quantizing with one.

``quantization.imatrix: auto`` runs llama.cpp's ``llama-imatrix`` on the F16 GGUF over the text verify
calibrates with (the model's evaluation samples through its chat template, plus a little general
text), so the weights the fine-tune actually uses for its own prompts keep the most precision.
Formats built with an imatrix then go to llama.cpp's ``llama-quantize --imatrix``: loradeploy's own
engine is byte-identical to ggml only without one.

The imatrix is cached by content (F16 sha256, calibration digest, tool version, context), so a
re-run with the same inputs reuses it. Every program runs through ``tools.proc.run``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import InputError, ProcError, QuantizeError
from ..fsutil import atomic_output, atomic_write_text

# ggml's Q8_0 quantizer takes no importance weights, and 16/32-bit types are not quantized at all:
# their bytes are the same with or without an imatrix, so the fast engine may still build them.
IMATRIX_BLIND = frozenset({"F32", "F16", "BF16", "Q8_0"})
# Formats that verify also measures without the imatrix (a plain twin, never served), to show what it bought.
TWIN_FORMATS = ("Q4_K_M",)
MAX_CTX = 512          # llama-imatrix's own default chunk


def uses_imatrix(fmt: str) -> bool:
    return fmt.upper() not in IMATRIX_BLIND


def twin_path(gguf: Path) -> Path:
    """Where the plain (no-imatrix) twin of an imatrix quant lives; verify looks here."""
    return Path(gguf).parent / "no-imatrix" / Path(gguf).name


def plan(formats: list[str], gguf_of: Callable[[str], Path], imatrix: Optional[Path],
         built: set[str]) -> list[tuple[str, Path, Optional[Path]]]:
    """llama.cpp's jobs (format, output, imatrix): the formats not built yet, then verify's plain twins
    of the imatrix quants. A twin left from an earlier imatrix run is removed: it would mislead verify."""
    jobs = [(f, gguf_of(f), imatrix if uses_imatrix(f) else None) for f in formats if f not in built]
    twins = [f for f in formats if imatrix is not None and f in TWIN_FORMATS]
    for f in set(formats) - set(twins):
        twin_path(gguf_of(f)).unlink(missing_ok=True)
    return jobs + [(f, twin_path(gguf_of(f)), None) for f in twins]


@dataclass(frozen=True)
class CalibrationText:
    text: str
    digest: str          # of the token ids verify scores (calibration.Calibration.digest)
    n_tokens: int


@dataclass(frozen=True)
class CalibrationSource:
    """What verify calibrates with (its settings, the model's samples and system prompt)."""

    base_model: str
    adapter_dir: Optional[Path]
    system_prompt: str
    calibration: Optional[Path]
    samples: Optional[Path]
    max_tokens: int
    max_seq_len: int

    def inputs(self) -> dict:
        """What the imatrix depends on, cheaply (no tokenizer): for the quantize stage's inputs hash."""
        from ..fsutil import sha256_file

        f = self.calibration or self.samples
        return {"calibration": sha256_file(f) if f is not None and Path(f).is_file() else None,
                "max_tokens": self.max_tokens, "max_seq_len": self.max_seq_len, "system_prompt": self.system_prompt}

    def build(self):
        """(the tokenizer, verify's calibration set: verify.calibration.Calibration)."""
        from ..merge import resolve_base
        from ..verify.calibration import build_calibration, load_tokenizer

        tok = load_tokenizer(resolve_base(self.base_model), self.adapter_dir)
        return tok, build_calibration(tok, system_prompt=self.system_prompt, calibration=self.calibration,
                                      samples=self.samples, max_tokens=self.max_tokens, max_seq_len=self.max_seq_len)

    def build_with_more(self, extra: int):
        """(verify's calibration set, the same source read ``extra`` tokens further): the tuned search
        scores on the sequences only the second holds (tuned.scorer.search_sequences)."""
        from ..verify.calibration import build_calibration

        tok, cal = self.build()
        more = build_calibration(tok, system_prompt=self.system_prompt, calibration=self.calibration,
                                 samples=self.samples, max_tokens=cal.n_tokens + extra, max_seq_len=self.max_seq_len)
        return cal, more

    def text(self) -> CalibrationText:
        """Verify's calibration set, decoded back to text with its special tokens (llama-imatrix reads
        text; ``--parse-special`` turns the chat template's markers back into their tokens)."""
        tok, cal = self.build()
        bos = getattr(tok, "bos_token", None)
        parts = []
        for seq in cal.sequences:
            text = tok.decode(seq, skip_special_tokens=False)
            # llama-imatrix puts BOS at the start of every chunk itself; more of them mid-stream would be noise
            parts.append(text[len(bos):].lstrip() if bos and text.startswith(bos) else text)
        return CalibrationText("\n\n".join(parts), cal.digest(), cal.n_tokens)


def setting_inputs(setting, source: CalibrationSource) -> object:
    """quantization.imatrix as the stage's inputs hash sees it: a file by content, auto by its calibration."""
    from ..fsutil import sha256_file

    if setting == "auto":
        return {"auto": source.inputs(), "code": 1}
    return sha256_file(setting) if setting is not None and Path(setting).is_file() else setting and str(setting)


def resolve(setting, f16: Path, f16_sha256: Optional[str], source: CalibrationSource, out_dir: Path, *,
            threads: int, log_path: Optional[Path]) -> tuple[Optional[Path], str]:
    """(the importance matrix to quantize with, a line for the log): None when none is configured,
    the configured file, or one computed from the calibration text (cached)."""
    if setting != "auto":
        if setting is not None and not Path(setting).is_file():
            raise InputError(f"quantization.imatrix {setting} does not exist", hint="give an imatrix file, or auto")
        return (Path(setting), f"importance matrix {setting}") if setting is not None else (None, "")
    from ..fsutil import sha256_file

    cal = source.text()
    path, fresh = compute(f16, f16_sha256 or sha256_file(f16), cal, out_dir, threads=threads, log_path=log_path)
    return path, f"importance matrix {path.name} ({'computed' if fresh else 'cached'}, {cal.n_tokens} tokens)"


def context_for(n_tokens: int) -> int:
    """llama-imatrix wants at least two chunks of context; llama.cpp's tokenizer may count a few
    tokens fewer than the Hugging Face one, hence the margin."""
    n = min(MAX_CTX, int(n_tokens * 0.45)) // 16 * 16
    if n < 32:
        raise InputError(f"only {n_tokens} calibration tokens: too few for an importance matrix",
                         hint="raise verify.max_tokens or give verify.calibration more text")
    return n


def cache_key(f16_sha256: str, cal_digest: str, tool_version: str, n_ctx: int) -> str:
    raw = "\n".join([f16_sha256, cal_digest, tool_version, str(n_ctx)])
    return hashlib.sha256(raw.encode()).hexdigest()


def compute(f16: Path, f16_sha256: str, cal: CalibrationText, out_dir: Path, *, threads: int,
            log_path: Optional[Path], timeout: Optional[float] = None) -> tuple[Path, bool]:
    """(the imatrix file, whether it was computed now) for ``f16`` over ``cal``; cached in ``out_dir``."""
    from ..llamacpp import runtime
    from ..llamacpp.tools import reported_version, tool
    from ..tools.proc import run

    exe = tool("llama-imatrix")
    n_ctx = context_for(cal.n_tokens)
    key = cache_key(f16_sha256, cal.digest, reported_version("llama-imatrix"), n_ctx)
    final = Path(out_dir) / f"imatrix-{key[:24]}.gguf"
    if final.is_file() and final.stat().st_size > 0:
        return final, False
    final.parent.mkdir(parents=True, exist_ok=True)
    text_file = final.with_suffix(".txt")
    atomic_write_text(text_file, cal.text)
    with atomic_output(final) as tmp:
        argv = [exe, "-m", f16, "-f", text_file, "-o", tmp, "--output-format", "gguf", "-c", str(n_ctx),
                "-b", str(n_ctx), "-t", str(threads), "-tb", str(threads), "--no-ppl", "--parse-special",
                "--output-frequency", "1000000"]
        if not runtime.decide().extra_bufts:
            # the machine's verdict: llama.cpp's repacked / AMX weight buffers kill the process here
            argv.append("--no-repack")
        try:
            run(argv, log_path=log_path, timeout=timeout, what="llama-imatrix")
        except ProcError as exc:
            raise QuantizeError(f"computing the importance matrix failed: {exc.message}",
                                hint=f"see {log_path}") from None
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise QuantizeError("llama-imatrix wrote no importance matrix", hint=f"see {log_path}")
    return final, True


def quantize_argv(src: Path, dst: Optional[Path], fmt: str, *, threads: int, imatrix: Optional[Path],
                  output_tensor_type: Optional[str] = None, token_embedding_type: Optional[str] = None,
                  leave_output_tensor: bool = False, pure: bool = False, allow_requantize: bool = False,
                  tensor_type_file: Optional[Path] = None, dry_run: bool = False) -> list:
    """llama-quantize's command line; ``dst`` None with ``dry_run`` (it then only reports the sizes)."""
    from ..llamacpp.tools import tool

    argv: list = [tool("llama-quantize")]
    for flag, on in (("--allow-requantize", allow_requantize), ("--leave-output-tensor", leave_output_tensor),
                     ("--pure", pure), ("--dry-run", dry_run)):
        if on:
            argv.append(flag)
    for flag, value in (("--output-tensor-type", output_tensor_type), ("--token-embedding-type", token_embedding_type),
                        ("--tensor-type-file", tensor_type_file), ("--imatrix", imatrix)):
        if value:
            argv += [flag, str(value).lower() if flag.endswith("-type") else value]
    return argv + [src] + ([dst] if dst is not None else []) + [fmt, str(threads)]


def quantize(src: Path, dst: Path, fmt: str, *, threads: int, imatrix: Optional[Path], log_path: Optional[Path],
             on_progress: Optional[Callable[[float], None]] = None, **opts) -> None:
    """``llama-quantize [--imatrix FILE] src dst fmt threads``, written atomically to ``dst``."""
    from ..tools.llama_quantize import _PROGRESS  # the same "[ i/ n]" lines llama.cpp's quantizer prints
    from ..tools.proc import run

    def on_line(line: str) -> None:
        m = _PROGRESS.search(line)
        if m and on_progress:
            on_progress(int(m.group(1)) / max(1, int(m.group(2))))

    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(Path(dst)) as tmp:
        try:
            run(quantize_argv(src, tmp, fmt, threads=threads, imatrix=imatrix, **opts), log_path=log_path,
                what=f"llama-quantize {fmt}" + (" --imatrix" if imatrix else ""), on_line=on_line)
        except ProcError as exc:
            raise QuantizeError(f"quantizing to {fmt} failed: {exc.message}", hint=f"see {log_path}") from None


def run_job(src: Path, fmt: str, dst: Path, imatrix: Optional[Path], *, threads: int, log_path: Optional[Path],
            on_progress: Optional[Callable[[float], None]] = None, plain_binary: bool = False, **opts) -> None:
    """One llama.cpp quantize job. With an imatrix (and for a plain twin, so both halves of verify's
    comparison come from the same program) llama-quantize; otherwise llama-cpp-python's linked
    llama.cpp, which needs no built tools."""
    if imatrix is not None or plain_binary:
        quantize(src, dst, fmt, threads=threads, imatrix=imatrix, log_path=log_path, on_progress=on_progress, **opts)
        return
    from ..config import QUANT_TYPES
    from ..tools.llama_quantize import run_quantize

    with atomic_output(Path(dst)) as tmp:
        run_quantize(str(src), str(tmp), QUANT_TYPES[fmt], fmt=fmt, log_path=log_path, on_progress=on_progress,
                     nthread=threads, **opts)


def applied_imatrix(gguf: Path) -> Optional[str]:
    """The imatrix file a GGUF records it was quantized with (llama-quantize's ``quantize.imatrix.file``)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("quantize.imatrix.file")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else None
