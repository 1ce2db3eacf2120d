"""Cheap sensitivity of each tensor group: what each candidate type costs it, before any model runs.

- ``quant_errors``: per group and type, the importance-weighted noise-to-signal of quantizing and
  dequantizing the weight with ggml's own routines (the imatrix given, as llama-quantize would use it):
  ``sum(imatrix[j] * (w - dequant(quant(w)))**2) / sum(imatrix[j] * w**2)`` over rows and columns. With
  ``imatrix[j]`` the mean squared activation of column j, numerator and denominator are the expected
  squared change and the expected squared size of the layer's output per token, so groups with and without
  an imatrix entry (token_embd: a lookup, never a matmul) are on one scale. Rows are sampled evenly
  (about ``ROW_ELEMENTS`` weights, 16..``max_rows`` rows). The slow IQ3 types (their grid search quantizes
  10-30x slower than Q4_K) are measured on half as many rows in up to ``SLOW_LAYERS`` layers per kind; the
  other layers of the kind take their own Q3_K error times the kind's median IQ3/Q3_K ratio.
- ``adapter_deltas``: per group, the Frobenius norm of the LoRA delta ``scale * B @ A``, from the r x r
  products (no weight-sized matrix is formed); tensors the adapter replaces outright are listed apart.

The measured KLD against the PEFT reference is what confirms these (phase 2 of issue 20).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import math
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .. import kernels
from ..gguf_out import TYPE_SIZES, SourceGGUF, row_bytes
from ..importance import Importance
from ..rules import (IQ3_S, IQ3_XXS, IQ4_XS, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0, Unsupported, fallback_type,
                     requires_imatrix)
from .recipe import Group, evenly

# Types both this engine and llama.cpp write, from the fewest bits to the most; the IQ types only with an
# imatrix (IQ3_XXS cannot be written without one; the others lose much more without).
K_TYPES = (Q3_K, Q4_K, Q5_K, Q6_K, Q8_0)
IQ_TYPES = (IQ3_XXS, IQ3_S, IQ4_XS)
LOW_TYPES = (Q2_K,)
SLOW_TYPES = (IQ3_XXS, IQ3_S)
SLOW_LAYERS = 4
MAX_ROWS = 64
MIN_ROWS = 16
ROW_ELEMENTS = 1 << 16     # rows sampled per group: about this many weights, 16..64 rows


def candidates(g: Group, has_imatrix: bool, *, low_bits: bool = False) -> list[int]:
    """The types ``g`` may take: a type whose block does not fit its rows becomes llama.cpp's fallback."""
    wanted = (LOW_TYPES if low_bits else ()) + K_TYPES + (IQ_TYPES if has_imatrix else ())
    out: list[int] = []
    for ty in wanted:
        try:
            ty = fallback_type(g.n_per_row, ty)
        except Unsupported:
            continue
        if ty not in out and g.n_per_row % TYPE_SIZES[ty][0] == 0:
            out.append(ty)
    return out


@dataclass
class Errors:
    by_group: dict[str, dict[int, float]]          # group -> type -> importance-weighted noise-to-signal
    frob2: dict[str, float]                        # group -> squared Frobenius norm of the weight
    sampled_rows: dict[str, int] = field(default_factory=dict)
    scaled: dict[str, list[int]] = field(default_factory=dict)   # group -> types scaled from its kind's ratio
    timing: dict[int, list[float]] = field(default_factory=dict)  # type -> [seconds quantizing, elements]

    def seconds_per_element(self, ty: int) -> Optional[float]:
        """CPU seconds this machine took per element quantizing to ``ty`` (None: not measured)."""
        s, n = self.timing.get(ty, (0.0, 0))
        return s / n if n else None


def _one(src: SourceGGUF, data: np.memmap, g: Group, types: list[int], im: Optional[np.ndarray],
         max_rows: int) -> tuple[dict[int, float], float, int, dict[int, tuple[float, int]]]:
    t = src.by_name[g.name]
    rb = row_bytes(t.ggml_type, t.n_per_row)
    idx = evenly(t.rows, max(MIN_ROWS, min(max_rows, ROW_ELEMENTS // max(1, t.n_per_row))))
    start = src.data_start + t.offset
    raw = np.concatenate([data[start + i * rb:start + (i + 1) * rb] for i in idx])
    x = kernels.to_f32(raw, t.ggml_type, np.empty(len(idx) * t.n_per_row, np.float32)).reshape(len(idx), -1)
    w = np.ones(t.n_per_row, np.float64) if im is None else im.astype(np.float64)
    x64 = x.astype(np.float64)
    out, timing = {}, {}
    for ty in types:
        if ty == t.ggml_type:
            out[ty] = 0.0
            continue
        if requires_imatrix(g.name, ty) and im is None:
            continue                     # llama.cpp refuses it
        step = 2 if ty in SLOW_TYPES and len(idx) > 1 else 1
        xs, xs64 = np.ascontiguousarray(x[::step]), x64[::step]
        q = np.empty(len(xs) * row_bytes(ty, t.n_per_row), np.uint8)
        t0 = time.perf_counter()
        kernels.quantize_rows(ty, xs, q, imatrix=im)
        timing[ty] = (time.perf_counter() - t0, xs.size)
        y = kernels.dequantize(ty, q, xs.size).reshape(xs.shape)
        out[ty] = float(((xs64 - y) ** 2 @ w).sum()) / (float((xs64 ** 2 @ w).sum()) or 1.0)
    return out, float((x64 ** 2).sum()) * t.rows / len(idx), len(idx), timing


def quant_errors(src: SourceGGUF, groups: Iterable[Group], types: dict[str, list[int]],
                 imatrix: Optional[Importance] = None, *, max_rows: int = MAX_ROWS, threads: int = 1) -> Errors:
    """Each group's error in each of ``types[group]`` (see the module doc)."""
    groups = list(groups)
    data = np.memmap(src.path, np.uint8, mode="r")
    res = Errors({}, {})
    by_kind: dict[str, list[Group]] = {}
    for g in groups:
        by_kind.setdefault(g.kind, []).append(g)
    slow_at = {gs[i].name for gs in by_kind.values() for i in evenly(len(gs), SLOW_LAYERS)}

    def work(g: Group):
        im = imatrix.for_tensor(src.by_name[g.name]) if imatrix is not None else None
        tys = types[g.name] if g.name in slow_at else [ty for ty in types[g.name] if ty not in SLOW_TYPES]
        return g.name, _one(src, data, g, tys, im, max_rows)

    with cf.ThreadPoolExecutor(max(1, threads)) as pool:
        for name, (errs, frob2, n, timing) in pool.map(work, groups):
            res.by_group[name], res.frob2[name], res.sampled_rows[name] = errs, frob2, n
            for ty, (sec, elems) in timing.items():
                acc = res.timing.setdefault(ty, [0.0, 0])
                acc[0], acc[1] = acc[0] + sec, acc[1] + elems
    for gs in by_kind.values():
        _scale_slow(res, gs, types, slow_at)
    return res


def _scale_slow(res: Errors, gs: list[Group], types: dict[str, list[int]], slow_at: set[str]) -> None:
    """The slow types of the kind's unmeasured layers: Q3_K's error times the measured layers' median ratio."""
    for ty in SLOW_TYPES:
        ratios = [e[ty] / e[Q3_K] for g in gs if g.name in slow_at
                  for e in [res.by_group[g.name]] if ty in e and e.get(Q3_K, 0) > 0]
        if not ratios:
            continue
        r = float(np.median(ratios))
        for g in gs:
            e = res.by_group[g.name]
            if g.name not in slow_at and ty in types[g.name] and e.get(Q3_K, 0) > 0:
                e[ty] = e[Q3_K] * r
                res.scaled.setdefault(g.name, []).append(ty)


# ------------------------------------------------------------------------------------------ the adapter

@dataclass
class Deltas:
    norm: dict[str, float]            # GGUF tensor name -> ||scale * B @ A||_F
    replaced: set[str]                # tensors the adapter saves whole (modules_to_save)
    unmapped: list[str]               # adapter modules with no tensor in the GGUF


def _st_tensor(path: Path, header: dict, key: str, start: int) -> np.ndarray:
    meta = header[key]
    code = {"F16": 1, "BF16": 30, "F32": 0}.get(meta["dtype"])
    if code is None:
        raise Unsupported(f"adapter tensor {key} is {meta['dtype']}")
    b0, b1 = meta["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + b0)
        raw = np.frombuffer(f.read(b1 - b0), np.uint8)
    n = math.prod(meta["shape"])
    return kernels.to_f32(raw, code, np.empty(n, np.float32)).reshape(meta["shape"]).astype(np.float64)


def delta_norm(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    """||scale * B @ A||_F = |scale| * sqrt(trace((B^T B)(A A^T))), from r x r matrices."""
    return abs(scale) * math.sqrt(max(0.0, float(((b.T @ b) * (a @ a.T)).sum())))


def adapter_deltas(adapter_dir: Path, gguf: Path) -> Deltas:
    """Per tensor of ``gguf`` (the merged F16), how much the adapter at ``adapter_dir`` changes it."""
    from ...merge.hf_folder import load_adapter_info
    from ..reuse import gguf_names

    info = load_adapter_info(adapter_dir)
    hf = {f"{m}.weight": m for m in info.pairs}
    mapped = gguf_names(gguf, [*hf, *info.full_tensors]) or {}
    with open(info.weights, "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]
    header = {k: v for k, v in json.loads(info.weights.read_bytes()[8:start]).items() if k != "__metadata__"}
    out = Deltas({}, set(), [])
    for name, module in hf.items():
        g = mapped.get(name)
        if g is None:
            out.unmapped.append(module)
            continue
        pair = info.pairs[module]
        a = _st_tensor(info.weights, header, pair.a_key, start)
        b = _st_tensor(info.weights, header, pair.b_key, start)
        out.norm[g] = delta_norm(a, b, info.scale(module))
    for name in info.full_tensors:
        if mapped.get(name) is not None:
            out.replaced.add(mapped[name])
    return out


def adapter_weights(deltas: Deltas, frob2: dict[str, float], *, strength: float = 1.0) -> dict[str, float]:
    """A multiplier per group for its quantization error: 1 where the adapter left the tensor alone,
    ``1 + strength * rel / mean(rel)`` where it changed it by ``rel = ||dW|| / ||W||`` (replaced tensors
    count as the most changed), so at equal error the groups the adapter changed most win bits."""
    rel = {n: d / math.sqrt(frob2[n]) for n, d in deltas.norm.items() if frob2.get(n, 0) > 0}
    top = max(rel.values(), default=1.0) or 1.0
    rel.update({n: top for n in deltas.replaced if n in frob2})
    mean = sum(rel.values()) / len(rel) if rel else 1.0
    return {n: 1.0 + strength * rel.get(n, 0.0) / (mean or 1.0) for n in frob2}
