"""Recipe files in llama.cpp's --tensor-type-file format, candidate types and their fallbacks, the
imatrix reader's arithmetic and header keys, and ggml's dequantizer as the sensitivity uses it."""
from __future__ import annotations

import re

import numpy as np
import pytest

from loradeploy.quantize import importance, kernels
from loradeploy.quantize.gguf_out import Tensor
from loradeploy.quantize.rules import IQ4_NL, IQ4_XS, Q4_0, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, Unsupported
from loradeploy.quantize.tuned import Group, Recipe, RecipeError, parse_entries
from loradeploy.quantize.tuned.sensitivity import candidates


def test_recipe_text_groups_layers_and_reads_back():
    types = {"token_embd.weight": Q6_K, "output.weight": Q8_0, "blk.0.attn_q.weight": Q5_K,
             "blk.10.attn_q.weight": Q5_K, "blk.1.attn_q.weight": Q4_K, "blk.1.ffn_down.weight": IQ4_XS}
    r = Recipe("Q4_K_M", types)
    text = r.text()
    assert "^blk\\.(0|10)\\.attn_q\\.weight$=q5_k\n" in text and "^token_embd\\.weight$=q6_k\n" in text
    assert "#" not in text and all(len(ln.split()) == 1 for ln in text.splitlines())   # llama.cpp reads tokens
    entries = parse_entries(text)
    assert entries == r.overrides()
    for name, ty in types.items():   # every tensor matched by exactly one entry, of its own type
        hits = [t for p, t in entries if re.search(p, name)]
        assert hits == [ty], name
    assert not any(re.search(p, "blk.100.attn_q.weight") for p, _ in entries)
    assert r.counts() == {"Q6_K": 1, "Q8_0": 1, "Q5_K": 2, "Q4_K": 1, "IQ4_XS": 1}


def test_parse_entries_is_as_strict_as_llama_quantize():
    assert parse_entries("ATTN_Q=Q4_k  ffn_(up|gate)=iq4_xs\n") == (("attn_q", Q4_K), ("ffn_(up|gate)", IQ4_XS))
    for bad in ("attn_q", "=q4_k", "attn_q=", "attn_q=q9_k", "# comment", "attn_(q=q4_k"):
        with pytest.raises(RecipeError):
            parse_entries(bad)
    with pytest.raises(RecipeError):
        Recipe("Q3_K_M", {})


def test_candidates_respect_block_sizes_and_fallbacks():
    fits = Group("blk.0.ffn_down.weight", "ffn_down", 0, 8, 4096)
    assert candidates(fits, False) == [11, Q4_K, Q5_K, Q6_K, Q8_0]
    assert set(candidates(fits, True)) >= {18, 21, IQ4_XS}
    odd = Group("blk.0.ffn_down.weight", "ffn_down", 0, 8, 288)      # 288 = 9 x 32: no 256-block type fits
    assert candidates(odd, True) == [Q4_0, Q5_0, Q5_1, Q8_0, IQ4_NL]
    assert candidates(Group("x.weight", "other", -1, 8, 100), False) == [1]     # llama.cpp: F16


def _imatrix(path, entries: dict[str, tuple[np.ndarray, np.ndarray]], datasets=("calibration.txt",), chunks=4,
             metadata=True):
    import gguf

    w = gguf.GGUFWriter(str(path), "imatrix", use_temp_file=False)
    w.add_type("imatrix")
    if metadata:
        w.add_array("imatrix.datasets", list(datasets))
        w.add_uint32("imatrix.chunk_count", chunks)
        w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        w.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
        w.add_tensor(f"{name}.counts", counts.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_imatrix_values_and_keys_as_llama_quantize_makes_them(tmp_path):
    sums = np.arange(1, 9, dtype=np.float32)
    p = _imatrix(tmp_path / "im.gguf", {"blk.0.attn_q.weight": (sums, np.array([3.4])),
                                        "blk.0.attn_k.weight": (sums, np.array([0.0])),
                                        "token_embd.weight": (sums[:4], np.array([1.0]))}, datasets=["d" * 200], chunks=0)
    im = importance.load(p, "given/as.gguf")
    assert np.array_equal(im.values["blk.0.attn_q.weight"], sums / np.float32(3))    # lround(3.4) = 3
    assert np.array_equal(im.values["blk.0.attn_k.weight"], np.ones(8, np.float32))   # no count: weights of 1
    keys = [k for k, _ in im.kvs()]
    assert keys == ["quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count"]
    raw = dict(im.kvs())
    assert raw["quantize.imatrix.file"].endswith(b"given/as.gguf")
    assert raw["quantize.imatrix.dataset"].endswith(b"d" * 127)     # llama.cpp keeps 127 bytes
    assert im.for_tensor(Tensor("blk.0.attn_q.weight", (8, 4), 1, 0)) is not None
    assert im.for_tensor(Tensor("blk.0.attn_v.weight", (8, 4), 1, 0)) is None
    assert im.for_tensor(Tensor("token_embd.weight", (8, 4), 1, 0)) is None     # wrong size: quantized without
    assert raw["quantize.imatrix.entries_count"].endswith((3).to_bytes(4, "little"))
    with pytest.raises(Unsupported, match="size"):
        im.for_tensor(Tensor("blk.0.attn_q.weight", (16, 4), 1, 0))
    with pytest.raises(Unsupported, match="metadata"):
        importance.load(_imatrix(tmp_path / "bare.gguf", {"a.weight": (sums, np.array([1.0]))}, metadata=False))
    (tmp_path / "legacy.dat").write_bytes(b"\x01\x00\x00\x00garbage")
    with pytest.raises(Unsupported):
        importance.load(tmp_path / "legacy.dat")


@pytest.mark.parametrize("ty", [Q4_K, Q6_K, Q8_0, IQ4_XS, IQ4_NL, 21])
def test_dequantize_is_ggml_own(ty):
    from gguf import GGMLQuantizationType, quants

    x = kernels.adversarial_blocks(8).copy()
    q = np.empty(x.shape[0] * kernels.row_bytes(ty, x.shape[1]), np.uint8)
    kernels.quantize_rows(ty, x, q)
    ours = kernels.dequantize(ty, q, x.size)
    ref = quants.dequantize(q.reshape(x.shape[0], -1), GGMLQuantizationType(ty)).reshape(-1)
    assert np.allclose(ours, ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        kernels.ggml_quantize(16, x, np.empty(x.shape[0] * kernels.row_bytes(16, 256), np.uint8))   # IQ2_XXS
