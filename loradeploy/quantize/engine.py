"""One pass over an F16 GGUF that writes every requested format, byte-identical to llama.cpp.

Per tensor, in llama.cpp's output order: the bytes are read once (a reader thread fetches the next
tensor, and hashes it for the cache, while this one is quantized); each distinct target type is
produced once however many formats use it (Q4_K_M and Q5_K_M share their Q6_K tensors); rows are
split across a thread pool and each chunk of rows is turned into float32 once for all the types it
feeds; a writer thread appends the results to every output file, hashing as it writes.

An output may be a recipe (a base format and llama.cpp's --tensor-type overrides), and an importance
matrix may be given: the bytes are then those of ``llama-quantize --tensor-type-file R --imatrix I``
(types that use the weights go to ggml's own quantizer, which is what llama.cpp runs).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np

from ..fsutil import hashing_open
from . import kernels
from .cache import TensorCache
from .gguf_out import GGUFFormatError, SourceGGUF, Tensor, header, loader_order, pad, read_source, row_bytes, type_name
from .importance import Importance
from .rules import FORMATS, LLAMA_CPP_VERSION, Options, Unsupported, model_of, requires_imatrix, tensor_types

ENGINE_VERSION = f"e1-llama{LLAMA_CPP_VERSION}"   # part of every cache key
CHUNK_ELEMENTS = 1 << 22          # float32 scratch per task: 16 MiB
Progress = Callable[[float, float], None]
# output label -> (base format, --tensor-type overrides as (lower-cased regex, ggml type))
Recipes = Mapping[str, tuple[str, tuple[tuple[str, int], ...]]]


@dataclass
class FormatResult:
    fmt: str
    path: Path
    sha256: str
    size: int
    types: dict[str, int]          # tensor type name -> count


@dataclass
class EngineResult:
    outputs: dict[str, FormatResult]
    stats: dict = field(default_factory=dict)


@dataclass
class Plan:
    src: SourceGGUF
    order: list[Tensor]
    types: dict[str, list[int]]    # output -> type of each tensor of ``order``
    ftypes: dict[str, int] = field(default_factory=dict)    # output -> general.file_type


def make_plan(src_path: Path, formats: list[str], opts: Options = Options(), *, recipes: Recipes | None = None,
              has_imatrix: bool = False) -> Plan:
    """Raises Unsupported when llama.cpp's own quantizer must do this. An output named in ``recipes``
    is its base format with those overrides; any other is a format."""
    src = read_source(src_path)
    model = model_of(src)
    order = loader_order(src.tensors)
    recipes = recipes or {}
    targets = {f: (recipes[f][0], replace(opts, overrides=tuple(recipes[f][1]))) if f in recipes else (f, opts)
               for f in formats}
    for base, _ in targets.values():
        if base not in FORMATS:
            raise Unsupported(f"format {base}")
    return Plan(src, order, {f: tensor_types(order, model, b, o, has_imatrix) for f, (b, o) in targets.items()},
                {f: FORMATS[b][0] for f, (b, _) in targets.items()})


def why_unsupported(src_path: Path, formats: list[str], opts: Options = Options(), *,
                    recipes: Recipes | None = None, imatrix: Importance | None = None) -> Optional[str]:
    try:
        _check_imatrix(make_plan(src_path, formats, opts, recipes=recipes, has_imatrix=imatrix is not None), imatrix)
    except Unsupported as exc:
        return str(exc)
    return None


def _check_imatrix(plan: Plan, imatrix: Importance | None) -> dict[str, Optional[np.ndarray]]:
    """Each tensor's importance weights; refuses what llama.cpp (or ggml, by aborting) refuses."""
    weights = {t.name: imatrix.for_tensor(t) if imatrix is not None else None for t in plan.order}
    for i, t in enumerate(plan.order):
        for types in plan.types.values():
            ty = types[i]
            if ty != t.ggml_type and weights[t.name] is None and (requires_imatrix(t.name, ty) or
                                                                   ty in kernels.GGML_NEEDS_IMATRIX):
                raise Unsupported(f"no importance weights for {t.name}, which {type_name(ty)} needs")
    return weights


def _reader(plan: Plan, q: "queue.Queue", digest_of: Callable[[str], bool], stop: threading.Event) -> None:
    try:
        with open(plan.src.path, "rb", buffering=0) as f:
            for t in plan.order:
                if stop.is_set():
                    return
                raw = np.empty(t.nbytes(), np.uint8)
                f.seek(plan.src.data_start + t.offset)
                if f.readinto(memoryview(raw)) != raw.nbytes:
                    raise GGUFFormatError(f"{plan.src.path} ends inside tensor {t.name}")
                digest = hashlib.sha256(raw).hexdigest() if digest_of(t.name) else None
                q.put((t, raw, digest))
        q.put(None)
    except BaseException as exc:  # handed to the main thread, which raises it
        q.put(exc)


class _Quantizer:
    def __init__(self, pool: cf.Executor, threads: int, use_fast: bool):
        self.pool, self.threads, self.use_fast = pool, threads, use_fast
        self.seconds: Counter = Counter()

    def run(self, t: Tensor, raw: np.ndarray, todo: list[int], im: Optional[np.ndarray] = None) -> dict[int, np.ndarray]:
        n, rows = t.n_per_row, t.rows
        src_row = row_bytes(t.ggml_type, n)
        outs = {ty: np.empty(rows * row_bytes(ty, n), np.uint8) for ty in todo}
        per = max(1, min(-(-rows // self.threads), CHUNK_ELEMENTS // max(1, n)))

        def chunk(r0: int, r1: int) -> None:
            x = kernels.to_f32(raw[r0 * src_row:r1 * src_row], t.ggml_type, np.empty((r1 - r0) * n, np.float32))
            x = x.reshape(r1 - r0, n)
            for ty in todo:
                rb = row_bytes(ty, n)
                kernels.quantize_rows(ty, x, outs[ty][r0 * rb:r1 * rb], use_fast=self.use_fast, imatrix=im)

        t0 = time.perf_counter()
        list(self.pool.map(lambda r: chunk(r, min(rows, r + per)), range(0, rows, per)))
        dt = time.perf_counter() - t0
        for ty in todo:
            self.seconds[type_name(ty)] += dt / len(todo)
        return outs


def quantize_formats(src_path: Path, outputs: dict[str, Path], *, opts: Options = Options(), threads: int = 1,
                     cache: TensorCache | None = None, progress: Progress | None = None,
                     use_fast: bool = True, reusable: Callable[[str], bool] | None = None,
                     recipes: Recipes | None = None, imatrix: Importance | None = None) -> EngineResult:
    """Write each output of ``outputs`` (format or recipe label -> path) from the F16/BF16/F32 GGUF
    ``src_path``, with the importance matrix ``imatrix`` where given (importance.load).

    Only the tensors ``reusable(name)`` accepts (default: all) are looked up in and stored to ``cache``:
    those the adapter left alone, which another adapter or version of the base can reuse."""
    formats = list(outputs)
    plan = make_plan(src_path, formats, opts, recipes=recipes, has_imatrix=imatrix is not None)
    weights = _check_imatrix(plan, imatrix)
    ftype = plan.ftypes
    extra = imatrix.kvs() if imatrix is not None else ()
    cache = cache if cache is not None and cache.enabled else None
    t_start = time.perf_counter()
    total = float(sum(t.n_elements for t in plan.order)) or 1.0
    counts = Counter(copied=0, cached=0, computed=0)
    cacheable = (lambda name: cache is not None and (reusable is None or reusable(name)))
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    reader = threading.Thread(target=_reader, args=(plan, q, cacheable, stop), daemon=True)
    with cf.ThreadPoolExecutor(max(1, threads), thread_name_prefix="quantize") as pool, \
            cf.ThreadPoolExecutor(1, thread_name_prefix="gguf-write") as writer, \
            contextlib.ExitStack() as stack:
        files = {f: stack.enter_context(hashing_open(Path(p))) for f, p in outputs.items()}
        heads = {f: header(plan.src, plan.order, plan.types[f], ftype[f], extra) for f in formats}
        for f in formats:
            files[f].write(heads[f][0])
        qz = _Quantizer(pool, max(1, threads), use_fast)
        pending: cf.Future | None = None
        reader.start()
        done = 0.0
        try:
            for i in range(len(plan.order)):
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                t, raw, digest = item
                needed = {plan.types[f][i] for f in formats}
                im = weights[t.name]
                key = {ty: _cache_key(digest, ty, im, imatrix, t.name) for ty in needed}
                res: dict[int, object] = {}
                todo = []
                for ty in sorted(needed):
                    if ty == t.ggml_type:
                        res[ty] = raw
                        counts["copied"] += 1
                    elif key[ty] is not None and (hit := cache.get(key[ty], ty, t.nbytes(ty))) is not None:
                        res[ty] = hit
                        counts["cached"] += 1
                    else:
                        todo.append(ty)
                if todo:
                    computed = qz.run(t, raw, todo, im)
                    counts["computed"] += len(todo)
                    res.update(computed)
                    for ty, data in computed.items():
                        if key[ty] is not None:
                            cache.put(key[ty], ty, data)
                if pending is not None:
                    pending.result()
                sizes = {f: heads[f][1][i] for f in formats}
                pending = writer.submit(_write, files, {f: res[plan.types[f][i]] for f in formats}, sizes)
                done += t.n_elements
                if progress:
                    progress(done, total)
            if pending is not None:
                pending.result()
        finally:
            stop.set()
            while reader.is_alive():   # unblock a reader waiting on the full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    reader.join(0.05)
    results = {}
    for f in formats:
        w = files[f]
        results[f] = FormatResult(f, Path(outputs[f]), w.hexdigest(), w.nbytes,
                                  dict(Counter(type_name(ty) for ty in plan.types[f])))
    stats = {"seconds": round(time.perf_counter() - t_start, 3), "tensors": len(plan.order), **counts,
             "quantize_seconds_by_type": {k: round(v, 3) for k, v in qz.seconds.items()},
             "cache": cache.stats.to_dict() if cache is not None else None, "kernels": kernels.kernel_info(),
             "threads": threads, "engine_version": ENGINE_VERSION}
    return EngineResult(results, stats)


def _cache_key(digest: Optional[str], ty: int, im: Optional[np.ndarray], imatrix: Importance | None,
               name: str) -> Optional[str]:
    """The tensor's digest, joined with its importance weights' for a type that uses them."""
    if digest is None or im is None or ty in kernels.IMATRIX_BLIND:
        return digest
    return hashlib.sha256(f"{digest}:{imatrix.digest(name)}".encode()).hexdigest()


def _write(files: dict, data: dict, sizes: dict) -> None:
    for f, blob in data.items():
        mv = memoryview(blob).cast("B")
        if len(mv) != sizes[f]:
            raise RuntimeError(f"tensor size {len(mv)} != {sizes[f]} planned for {f}")
        files[f].write(mv)
        files[f].write(bytes(pad(sizes[f]) - sizes[f]))
