"""Quantize rows of float32: our C kernels where built and proven, ggml's reference otherwise.

ggml is reached through ``ggml_quantize_chunk`` in llama-cpp-python's ``lib/libggml-base.so`` (the
very routine llama_model_quantize calls), so it is both the fallback for every type and the oracle
the fast kernels are checked against. The check runs once per process on a fixed set of awkward
blocks (zeros, constants, outliers, huge and tiny values, signed zeros) plus random ones; a kernel
that disagrees by one byte is not used. Both paths release the GIL, so rows split across Python
threads run in parallel.
"""
from __future__ import annotations

import ctypes
import importlib
import logging
import threading
from pathlib import Path

import numpy as np

from .gguf_out import TYPE_NAMES, TYPE_SIZES, row_bytes, type_name

log = logging.getLogger(__name__)

try:  # built at install time; absent when the build failed or on a source checkout
    _kernels = importlib.import_module(f"{__package__}._kernels")
except ImportError:  # pragma: no cover - depends on the build
    _kernels = None

FAST_TYPES = (8, 12, 13, 14)   # Q8_0, Q4_K, Q5_K, Q6_K
IMATRIX_BLIND = frozenset({0, 1, 30, 8})   # F32 F16 BF16 Q8_0: ggml ignores importance weights for these
GGML_NEEDS_IMATRIX = frozenset({16, 17, 19})   # ggml_quantize_requires_imatrix: IQ2_XXS IQ2_XS IQ1_S
_lock = threading.RLock()   # has_fast holds it while the check loads ggml
_ggml: ctypes.CDLL | None = None
_verified: dict[int, bool] = {}


def ggml_lib() -> ctypes.CDLL:
    """libggml-base from llama-cpp-python, with the few signatures used here."""
    global _ggml
    with _lock:
        if _ggml is None:
            import llama_cpp

            path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
            if not path.exists():
                path = path.with_suffix(".dylib")
            lib = ctypes.CDLL(str(path))
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            lib.ggml_quantize_init.argtypes = [ctypes.c_int]
            lib.ggml_quantize_init.restype = None
            lib.ggml_fp16_to_fp32_row.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            lib.ggml_fp16_to_fp32_row.restype = None
            _ggml = lib
    return _ggml


def ggml_quantize(ggml_type: int, x: np.ndarray, out: np.ndarray, imatrix: np.ndarray | None = None) -> None:
    """ggml_quantize_chunk on float32 rows ``x`` (2-D, C order) into ``out`` (uint8), with the
    importance weights ``imatrix`` (float32, one per column) where given."""
    lib = ggml_lib()
    rows, n = x.shape
    if out.nbytes < rows * row_bytes(ggml_type, n):
        raise ValueError("output buffer too small")
    if imatrix is None and ggml_type in GGML_NEEDS_IMATRIX:
        raise ValueError(f"{type_name(ggml_type)} cannot be written without importance weights")  # ggml aborts
    if imatrix is not None and (imatrix.dtype != np.float32 or imatrix.size != n or not imatrix.flags.c_contiguous):
        raise ValueError("imatrix must be contiguous float32, one weight per column")
    done = lib.ggml_quantize_chunk(ggml_type, x.ctypes.data, out.ctypes.data, 0, rows, n,
                                   None if imatrix is None else imatrix.ctypes.data)
    if done != rows * row_bytes(ggml_type, n):
        raise RuntimeError(f"ggml_quantize_chunk wrote {done} bytes for {type_name(ggml_type)}")


class _TypeTraits(ctypes.Structure):   # struct ggml_type_traits (ggml.h of the pinned llama.cpp)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_to_float: dict[int, object] = {}


def dequantize(ggml_type: int, data: np.ndarray, n_elements: int) -> np.ndarray:
    """ggml's own to_float of ``ggml_type``: quantized bytes back to float32."""
    with _lock:
        if ggml_type not in _to_float:
            lib = ggml_lib()
            lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
            lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
            traits = lib.ggml_get_type_traits(ggml_type).contents
            if not traits.to_float or (traits.blck_size, traits.type_size) != TYPE_SIZES[ggml_type]:
                raise ValueError(f"ggml has no converter for {type_name(ggml_type)} as this module knows it")
            _to_float[ggml_type] = _TO_FLOAT(traits.to_float)
    data = np.ascontiguousarray(data, np.uint8)
    out = np.empty(n_elements, np.float32)
    if data.nbytes * TYPE_SIZES[ggml_type][0] != n_elements * TYPE_SIZES[ggml_type][1]:
        raise ValueError("data size does not match the element count")
    _to_float[ggml_type](data.ctypes.data, out.ctypes.data, n_elements)
    return out


def adversarial_blocks(n_blocks: int = 64, seed: int = 0) -> np.ndarray:
    """Super-blocks (256 values each) that stress the corner cases of the K-quant searches."""
    rng = np.random.default_rng(seed)
    k = 256
    cases = [np.zeros(k), np.full(k, 0.37), np.full(k, -1e-3), np.clip(rng.standard_normal(k) * 3e4, -65504, 65504),
             rng.standard_normal(k) * 1e-7, np.where(np.arange(k) % 2, -0.0, 0.0),
             np.where(np.arange(k) == 77, 40.0, rng.standard_normal(k) * 0.01),
             np.where(np.arange(k) == 3, -40.0, rng.standard_normal(k) * 0.01),
             np.abs(rng.standard_normal(k)), -np.abs(rng.standard_normal(k)),
             np.where(rng.random(k) < 0.9, 0.0, rng.standard_normal(k)), rng.integers(-8, 8, k).astype(float),
             np.concatenate([np.zeros(k // 2), rng.standard_normal(k // 2)]),
             np.repeat(rng.standard_normal(8), 32), np.repeat(rng.standard_normal(16), 16)]
    cases += [rng.standard_normal(k) * 0.02 for _ in range(max(0, n_blocks - len(cases)))]
    # through float16, as every real input of the engine is
    return np.stack(cases).astype(np.float16).astype(np.float32)


def _check(ggml_type: int) -> bool:
    x = adversarial_blocks()
    n = x.shape[1]
    ref = np.empty(x.shape[0] * row_bytes(ggml_type, n), np.uint8)
    ours = np.empty_like(ref)
    ggml_quantize(ggml_type, x, ref)
    _kernels.quantize(ggml_type, x, ours)
    ok = bool(np.array_equal(ref, ours))
    if not ok:
        log.warning("fast %s kernel disagrees with ggml on this machine; using ggml's", TYPE_NAMES[ggml_type])
    return ok


def has_fast(ggml_type: int) -> bool:
    """True when our kernel exists for this type and matched ggml byte for byte in this process."""
    if _kernels is None or ggml_type not in FAST_TYPES:
        return False
    with _lock:
        if ggml_type not in _verified:
            _verified[ggml_type] = _check(ggml_type)
        return _verified[ggml_type]


def kernel_info() -> dict:
    paths = {0: "scalar", 1: "simd", 2: "avx2"}
    return {"extension": _kernels is not None,
            "path": paths.get(getattr(_kernels, "BEST_PATH", -1), "none"),
            "fast_types": [TYPE_NAMES[t] for t in FAST_TYPES if _kernels is not None]}


def quantize_rows(ggml_type: int, x: np.ndarray, out: np.ndarray, *, use_fast: bool = True,
                  imatrix: np.ndarray | None = None) -> None:
    """Quantize the float32 rows ``x`` into ``out``: the same bytes whichever path runs. Our kernels
    take no importance weights: a type that uses them goes to ggml."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if imatrix is not None and ggml_type in IMATRIX_BLIND:
        imatrix = None
    if use_fast and imatrix is None and has_fast(ggml_type):
        _kernels.quantize(ggml_type, x, out)
    else:
        ggml_quantize(ggml_type, x, out, imatrix)


def to_f32(raw: np.ndarray, ggml_type: int, out: np.ndarray) -> np.ndarray:
    """F16 / BF16 / F32 bytes to float32 (every conversion exact, as ggml's row converters)."""
    if ggml_type == 1:
        np.copyto(out, raw.view(np.float16), casting="unsafe")
    elif ggml_type == 30:
        out.view(np.uint32)[...] = raw.view(np.uint16).astype(np.uint32) << 16
    elif ggml_type == 0:
        out[...] = raw.view(np.float32)
    else:
        raise ValueError(f"cannot convert type {ggml_type} to float32")
    return out
