"""One pass over an F16 GGUF that writes every requested format, byte-identical to llama.cpp.

Per tensor, in llama.cpp's output order: the bytes are read once (a reader thread fetches the next
tensor, and hashes it for the cache, while this one is quantized); each distinct target type is
produced once however many formats use it (Q4_K_M and Q5_K_M share their Q6_K tensors); rows are
split across a thread pool and each chunk of rows is turned into float32 once for all the types it
feeds; a writer thread appends the results to every output file, hashing as it writes.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..fsutil import hashing_open
from . import kernels
from .cache import TensorCache
from .gguf_out import (TYPE_NAMES, GGUFFormatError, SourceGGUF, Tensor, header, loader_order, pad, read_source,
                       row_bytes)
from .rules import FORMATS, LLAMA_CPP_VERSION, Options, Unsupported, model_of, tensor_types

ENGINE_VERSION = f"e1-llama{LLAMA_CPP_VERSION}"   # part of every cache key
CHUNK_ELEMENTS = 1 << 22          # float32 scratch per task: 16 MiB
Progress = Callable[[float, float], None]


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
    types: dict[str, list[int]]    # format -> type of each tensor of ``order``


def make_plan(src_path: Path, formats: list[str], opts: Options = Options()) -> Plan:
    """Raises Unsupported when llama.cpp's own quantizer must do this."""
    src = read_source(src_path)
    model = model_of(src)
    order = loader_order(src.tensors)
    return Plan(src, order, {f: tensor_types(order, model, f, opts) for f in formats})


def why_unsupported(src_path: Path, formats: list[str], opts: Options = Options()) -> Optional[str]:
    try:
        for f in formats:
            if f not in FORMATS:
                raise Unsupported(f"format {f}")
        make_plan(src_path, formats, opts)
    except Unsupported as exc:
        return str(exc)
    return None


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

    def run(self, t: Tensor, raw: np.ndarray, todo: list[int]) -> dict[int, np.ndarray]:
        n, rows = t.n_per_row, t.rows
        src_row = row_bytes(t.ggml_type, n)
        outs = {ty: np.empty(rows * row_bytes(ty, n), np.uint8) for ty in todo}
        per = max(1, min(-(-rows // self.threads), CHUNK_ELEMENTS // max(1, n)))

        def chunk(r0: int, r1: int) -> None:
            x = kernels.to_f32(raw[r0 * src_row:r1 * src_row], t.ggml_type, np.empty((r1 - r0) * n, np.float32))
            x = x.reshape(r1 - r0, n)
            for ty in todo:
                rb = row_bytes(ty, n)
                kernels.quantize_rows(ty, x, outs[ty][r0 * rb:r1 * rb], use_fast=self.use_fast)

        t0 = time.perf_counter()
        list(self.pool.map(lambda r: chunk(r, min(rows, r + per)), range(0, rows, per)))
        dt = time.perf_counter() - t0
        for ty in todo:
            self.seconds[TYPE_NAMES[ty]] += dt / len(todo)
        return outs


def quantize_formats(src_path: Path, outputs: dict[str, Path], *, opts: Options = Options(), threads: int = 1,
                     cache: TensorCache | None = None, progress: Progress | None = None,
                     use_fast: bool = True, reusable: Callable[[str], bool] | None = None) -> EngineResult:
    """Write each format of ``outputs`` (format -> path) from the F16/BF16/F32 GGUF ``src_path``.

    Only the tensors ``reusable(name)`` accepts (default: all) are looked up in and stored to ``cache``:
    those the adapter left alone, which another adapter or version of the base can reuse."""
    formats = list(outputs)
    plan = make_plan(src_path, formats, opts)
    ftype = {f: FORMATS[f][0] for f in formats}
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
        heads = {f: header(plan.src, plan.order, plan.types[f], ftype[f]) for f in formats}
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
                res: dict[int, object] = {}
                todo = []
                for ty in sorted(needed):
                    if ty == t.ggml_type:
                        res[ty] = raw
                        counts["copied"] += 1
                    elif digest is not None and (hit := cache.get(digest, ty, t.nbytes(ty))) is not None:
                        res[ty] = hit
                        counts["cached"] += 1
                    else:
                        todo.append(ty)
                if todo:
                    computed = qz.run(t, raw, todo)
                    counts["computed"] += len(todo)
                    res.update(computed)
                    if digest is not None:
                        for ty, data in computed.items():
                            cache.put(digest, ty, data)
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
                                  dict(Counter(TYPE_NAMES[ty] for ty in plan.types[f])))
    stats = {"seconds": round(time.perf_counter() - t_start, 3), "tensors": len(plan.order), **counts,
             "quantize_seconds_by_type": {k: round(v, 3) for k, v in qz.seconds.items()},
             "cache": cache.stats.to_dict() if cache is not None else None, "kernels": kernels.kernel_info(),
             "threads": threads, "engine_version": ENGINE_VERSION}
    return EngineResult(results, stats)


def _write(files: dict, data: dict, sizes: dict) -> None:
    for f, blob in data.items():
        mv = memoryview(blob).cast("B")
        if len(mv) != sizes[f]:
            raise RuntimeError(f"tensor size {len(mv)} != {sizes[f]} planned for {f}")
        files[f].write(mv)
        files[f].write(bytes(pad(sizes[f]) - sizes[f]))
