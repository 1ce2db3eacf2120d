"""The fast kernels against ggml_quantize_chunk, block by block, on the blocks that break quantizers."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from loradeploy.quantize import kernels
from loradeploy.quantize.gguf_out import TYPE_NAMES, row_bytes
from tests.fixtures.gguf_models import tiny_gguf_cache, tiny_ggufs  # noqa: F401  (fixtures)

ext = pytest.importorskip("loradeploy.quantize._kernels", reason="C kernels not built")
TYPES = {8: 34, 12: 144, 13: 176, 14: 210}            # ggml type -> bytes per block
PATHS = list(range(ext.BEST_PATH + 1))                 # scalar, SIMD, AVX2 where the CPU has it


def _sets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    n = 256 * 256
    f16 = lambda a: np.asarray(a, np.float64).astype(np.float16).astype(np.float32)  # noqa: E731
    return {
        "random": f16(rng.standard_normal(n) * 0.02),
        "gaussian": f16(rng.standard_normal(n)),
        "zeros": np.zeros(n, np.float32),
        "signed zeros": f16(np.where(rng.random(n) < 0.5, -0.0, 0.0)),
        "constant": f16(np.full(n, 0.37)),
        "negative constant": f16(np.full(n, -2.5)),
        "one outlier": f16(np.where(rng.random(n) < 1 / 256, 60.0, rng.standard_normal(n) * 0.01)),
        "huge": f16(np.clip(rng.standard_normal(n) * 3e4, -65504, 65504)),
        "tiny": f16(rng.standard_normal(n) * 1e-6),      # f16 subnormals
        "all positive": f16(np.abs(rng.standard_normal(n))),
        "all negative": f16(-np.abs(rng.standard_normal(n))),
        "sparse": f16(np.where(rng.random(n) < 0.95, 0.0, rng.standard_normal(n))),
        "small integers": f16(rng.integers(-8, 8, n)),
        "constant sub-blocks": f16(np.repeat(rng.standard_normal(n // 16), 16)),
        "float32 subnormal": (rng.standard_normal(n) * 1e-39).astype(np.float32),
        "adversarial": kernels.adversarial_blocks(256).ravel(),
    }


SETS = _sets()


def _ggml(t: int, x: np.ndarray) -> np.ndarray:
    out = np.empty(row_bytes(t, x.size), np.uint8)
    kernels.ggml_quantize(t, x.reshape(1, -1), out)
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ggml_type", list(TYPES))
@pytest.mark.parametrize("name", list(SETS))
def test_every_block_matches_ggml(ggml_type, name, path):
    x = SETS[name]
    ref = _ggml(ggml_type, x)
    ours = np.empty_like(ref)
    ext.quantize(ggml_type, x, ours, path)
    bad = np.flatnonzero((ref.reshape(-1, TYPES[ggml_type]) != ours.reshape(-1, TYPES[ggml_type])).any(1))
    assert bad.size == 0, f"{TYPE_NAMES[ggml_type]} path {path}: {bad.size} blocks differ, first {bad[:5]}"


def test_real_weights_match(tiny_ggufs):
    from loradeploy.quantize.gguf_out import read_source

    src = read_source(tiny_ggufs.path("v1", "F16"))
    raw = src.path.read_bytes()
    for t in src.tensors:
        if t.ggml_type != 1 or t.n_per_row % 256:
            continue
        b = raw[src.data_start + t.offset: src.data_start + t.offset + t.nbytes()]
        x = np.frombuffer(b, np.float16).astype(np.float32)
        for ty in TYPES:
            ours = np.empty(row_bytes(ty, x.size), np.uint8)
            ext.quantize(ty, x, ours)
            assert np.array_equal(ours, _ggml(ty, x)), (t.name, TYPE_NAMES[ty])


def test_rows_and_chunks_do_not_change_the_bytes():
    """Why rows can be split across threads: ggml's output for a chunk is a pure function of its rows."""
    x = SETS["random"].reshape(64, 1024)
    for ty in TYPES:
        whole = _ggml(ty, x.ravel())
        rb = row_bytes(ty, 1024)
        parts = np.concatenate([_ggml(ty, x[r:r + 5].ravel()) for r in range(0, 64, 5)])
        assert np.array_equal(whole, parts) and len(whole) == 64 * rb


def test_half_conversions_match_ggml():
    lib = kernels.ggml_lib()
    lib.ggml_fp32_to_fp16.restype = ctypes.c_uint16
    lib.ggml_fp32_to_fp16.argtypes = [ctypes.c_float]
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 0x7f800000, 20000, dtype=np.uint32)  # every finite magnitude
    vals = np.concatenate([bits.view(np.float32), -bits[:5000].view(np.float32),
                           np.float32([0.0, -0.0, 65504, 65519.99, 65520, 6.1035156e-05, 5.96e-8, 2.98e-8])])
    for v in vals:
        assert ext.to_half(float(v)) == lib.ggml_fp32_to_fp16(float(v)), v
    halves = np.arange(65536, dtype=np.uint16)
    finite = (halves & 0x7c00) != 0x7c00
    ours = np.empty(65536, np.float32)
    ext.f16_to_f32(halves, ours)
    ref = np.empty(65536, np.float32)
    lib.ggml_fp16_to_fp32_row(halves.ctypes.data, ref.ctypes.data, 65536)
    assert np.array_equal(ours.view(np.uint32)[finite], ref.view(np.uint32)[finite])


def test_fallback_and_self_check(monkeypatch):
    x = SETS["random"].reshape(16, -1)
    for ty in TYPES:
        a = np.empty(row_bytes(ty, x.size), np.uint8)
        b = np.empty_like(a)
        kernels.quantize_rows(ty, x, a, use_fast=True)
        kernels.quantize_rows(ty, x, b, use_fast=False)
        assert np.array_equal(a, b)
    # a kernel that disagrees with ggml on this machine is never used
    monkeypatch.setattr(kernels, "_verified", {})

    class Broken:
        BEST_PATH = 0

        @staticmethod
        def quantize(t, src, dst, path=-1):
            ext.quantize(t, src, dst)
            dst[0] ^= 1

    monkeypatch.setattr(kernels, "_kernels", Broken)
    assert not kernels.has_fast(12)
    out = np.empty(row_bytes(12, x.size), np.uint8)
    kernels.quantize_rows(12, x, out)
    assert np.array_equal(out, _ggml(12, x.ravel()))
    # and without the extension at all (its build failed), ggml does every type
    monkeypatch.setattr(kernels, "_kernels", None)
    assert not kernels.has_fast(14) and kernels.kernel_info()["extension"] is False
    out = np.empty(row_bytes(14, x.size), np.uint8)
    kernels.quantize_rows(14, x, out)
    assert np.array_equal(out, _ggml(14, x.ravel()))
