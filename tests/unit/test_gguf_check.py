"""Structural GGUF validation: one valid file in detail, then one test per kind of damage."""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from rich.console import Console

from gguf_samples import (HEADER_KV_COUNT, HEADER_TENSOR_COUNT, HEADER_VERSION, kv_fields, put_u32,
                          put_u64, tensor_fields, write_minimal, write_tiny_llama)
from loradeploy.gguf import check as gguf_check_module
from loradeploy.gguf import report as gguf_report
from loradeploy.errors import GGUFError, InputError
from loradeploy.fsutil import sha256_file
from loradeploy.gguf import check_gguf, render_report, validate_gguf


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf", quant="Q8_0")


@pytest.fixture
def data(sample) -> bytearray:
    return bytearray(sample.path.read_bytes())


def write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def rejected(path: Path, *words: str, **kw) -> str:
    with pytest.raises(GGUFError) as info:
        check_gguf(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"
    return msg


def codes(path: Path) -> set[str]:
    return {p.code for p in validate_gguf(path).errors}


def test_valid_file_report(sample):
    report = check_gguf(sample.path)
    assert report.ok and report.problems == []
    assert report.size == sample.path.stat().st_size
    assert report.version == 3
    assert report.architecture == "llama"
    assert report.name == "tiny-llama"
    assert report.file_type == int(LlamaFileType.MOSTLY_Q8_0)
    assert report.file_type_name == "MOSTLY_Q8_0"
    assert report.quant == "Q8_0"
    assert report.tensor_count == len(sample.tensors) == 12
    assert report.parameter_count == sample.parameter_count
    assert report.chat_template_present is True
    assert report.context_length == 256
    assert report.alignment == 32
    norms = 3 * sample.n_embd
    assert report.quant_mix == {
        "Q8_0": {"tensors": 9, "params": sample.parameter_count - norms,
                 "bytes": (sample.parameter_count - norms) // 32 * 34},
        "F32": {"tensors": 3, "params": norms, "bytes": norms * 4},
    }
    assert 8.5 <= report.bits_per_weight < 8.7
    # The converter's own reader (safe here: the file is known good) agrees on the layout.
    reader = GGUFReader(sample.path)
    assert report.kv_count == len(reader.fields) - 3  # reader adds 3 pseudo-fields for the header
    assert report.data_offset == reader.data_offset
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["quant"] == "Q8_0" and as_json["ok"] is True and as_json["problems"] == []


def test_render_report(sample, tmp_path):
    console = Console(file=io.StringIO(), width=120)
    console.print(render_report(validate_gguf(sample.path)))
    text = console.file.getvalue()
    assert "MOSTLY_Q8_0" in text and "OK" in text and "Q8_0" in text
    bad = write(tmp_path, b"GGUF\x09\x00\x00\x00")
    console = Console(file=io.StringIO(), width=120)
    console.print(render_report(validate_gguf(bad)))
    assert "INVALID" in console.file.getvalue() and "version" in console.file.getvalue()


@pytest.mark.parametrize("quant,n_embd,low,high", [
    ("F32", 64, 31.9, 32.1), ("F16", 64, 16.0, 16.2), ("Q4_0", 64, 4.5, 4.7), ("Q4_K_M", 256, 4.5, 4.6),
])
def test_other_quant_types(tmp_path, quant, n_embd, low, high):
    s = write_tiny_llama(tmp_path / f"{quant}.gguf", quant=quant, n_embd=n_embd, n_ff=2 * n_embd,
                         chat_template=False)
    report = check_gguf(s.path)
    assert report.quant == quant
    assert low <= report.bits_per_weight <= high
    assert report.chat_template_present is False


def test_minimal_file_and_custom_power_of_two_alignment(tmp_path):
    assert check_gguf(write_minimal(tmp_path / "m.gguf")).tensor_count == 3
    s = write_tiny_llama(tmp_path / "a64.gguf", alignment=64)
    report = check_gguf(s.path)
    assert report.alignment == 64 and report.data_offset % 64 == 0


def test_truncated_at_many_points(tmp_path, data, sample):
    ds = validate_gguf(sample.path).data_offset
    kv_mid = kv_fields(data, "tokenizer.ggml.tokens").value + 100
    ti_mid = tensor_fields(data, "blk.0.ffn_up.weight").dims + 3
    cuts = [0, 3, 6, 12, 20, 30, kv_mid, ti_mid, ds - 1, ds, ds + 1000, len(data) - 1]
    for cut in cuts:
        path = write(tmp_path, data[:cut], f"cut{cut}.gguf")
        msg = rejected(path)
        assert any(w in msg for w in ("truncated", "empty", "ends inside", "length")), (cut, msg)


def test_bad_magic(tmp_path, data):
    data[0:4] = b"GGML"
    rejected(write(tmp_path, data), "magic", "not a GGUF")


@pytest.mark.parametrize("version,word", [(1, "GGUFv1"), (4, "version 4"), (0x03000000, "big-endian"),
                                          (0, "version 0")])
def test_unsupported_version(tmp_path, data, version, word):
    put_u32(data, HEADER_VERSION, version)
    rejected(write(tmp_path, data), "unsupported GGUF version", word)


def test_version_2_is_accepted(tmp_path, data):
    put_u32(data, HEADER_VERSION, 2)
    assert check_gguf(write(tmp_path, data)).version == 2


@pytest.mark.parametrize("count", [2**40, 2**64 - 1, 100_000])
def test_absurd_tensor_count(tmp_path, data, count):
    put_u64(data, HEADER_TENSOR_COUNT, count)
    rejected(write(tmp_path, data), "tensor_count", f"claims {count} tensors")


@pytest.mark.parametrize("count", [2**40, 2**63, 50_000])
def test_absurd_kv_count(tmp_path, data, count):
    put_u64(data, HEADER_KV_COUNT, count)
    rejected(write(tmp_path, data), "kv_count", f"claims {count} key/value pairs")


def test_offset_past_end(tmp_path, data):
    f = tensor_fields(data, "blk.0.ffn_down.weight")
    put_u64(data, f.offset, 2**40)
    rejected(write(tmp_path, data), "data_range", "blk.0.ffn_down.weight", "past the end")


def test_offset_near_u64_max(tmp_path, data):
    put_u64(data, tensor_fields(data, "output.weight").offset, 2**64 - 32)
    rejected(write(tmp_path, data), "data_range", "output.weight")


@pytest.mark.parametrize("field", ["key", "value", "tensor_name", "array_item"])
def test_huge_string_length(tmp_path, data, field):
    if field == "key":
        pos = kv_fields(data, "general.name").key_len
    elif field == "value":
        pos = kv_fields(data, "general.name").value
    elif field == "tensor_name":
        pos = tensor_fields(data, "output_norm.weight").name_len
    else:
        pos = kv_fields(data, "tokenizer.ggml.tokens").value + 4 + 8  # first element's length
    put_u64(data, pos, 2**62)
    rejected(write(tmp_path, data), "string_length", str(2**62))


def test_huge_array_count(tmp_path, data):
    pos = kv_fields(data, "tokenizer.ggml.scores").value + 4
    put_u64(data, pos, 2**61)
    rejected(write(tmp_path, data), "array_length", "tokenizer.ggml.scores")


@pytest.fixture
def aligned64(tmp_path) -> tuple[bytearray, int, int]:
    s = write_tiny_llama(tmp_path / "a64.gguf", alignment=64)
    data = bytearray(s.path.read_bytes())
    f = kv_fields(data, "general.alignment")
    return data, f.value_type, f.value


@pytest.mark.parametrize("value", [48, 0, 3, 2**31 + 1])
def test_alignment_not_power_of_two(tmp_path, aligned64, value):
    data, _, value_pos = aligned64
    put_u32(data, value_pos, value)
    rejected(write(tmp_path, data), "alignment", f"alignment {value} is not a power of two")


def test_alignment_wrong_type(tmp_path, aligned64):
    # llama.cpp reads the key with gguf_get_val_u32, which aborts the process on other types.
    data, type_pos, _ = aligned64
    put_u32(data, type_pos, int(GGUFValueType.INT32))
    rejected(write(tmp_path, data), "alignment", "must be UINT32")


def test_huge_power_of_two_alignment(tmp_path, aligned64):
    data, _, value_pos = aligned64
    put_u32(data, value_pos, 2**31)
    rejected(write(tmp_path, data), "data_range")


def test_misaligned_offset(tmp_path, data):
    f = tensor_fields(data, "blk.0.attn_v.weight")
    offset = int.from_bytes(data[f.offset:f.offset + 8], "little")
    put_u64(data, f.offset, offset + 4)
    rejected(write(tmp_path, data), "misaligned", "blk.0.attn_v.weight", "not a multiple of the alignment 32")


def test_unknown_ggml_type(tmp_path, data):
    put_u32(data, tensor_fields(data, "blk.0.attn_q.weight").ggml_type, 99)
    rejected(write(tmp_path, data), "tensor_type", "unknown ggml type 99", "blk.0.attn_q.weight")


def test_removed_ggml_type(tmp_path, data):
    put_u32(data, tensor_fields(data, "blk.0.attn_q.weight").ggml_type, 4)  # Q4_2, long removed
    rejected(write(tmp_path, data), "unknown ggml type 4")


def test_unknown_kv_value_type(tmp_path, data):
    put_u32(data, kv_fields(data, "llama.block_count").value_type, 13)
    rejected(write(tmp_path, data), "kv_type", "unknown GGUF value type 13", "llama.block_count")


def test_unknown_array_element_type(tmp_path, data):
    put_u32(data, kv_fields(data, "tokenizer.ggml.scores").value, 77)
    rejected(write(tmp_path, data), "kv_type", "array of unknown GGUF value type 77")


def test_n_dims_over_four(tmp_path, data):
    put_u32(data, tensor_fields(data, "output_norm.weight").n_dims, 5)
    rejected(write(tmp_path, data), "n_dims", "n_dims=5", "output_norm.weight")


@pytest.mark.parametrize("value,word", [(0, "dimension 0 is 0"), (2**63, "dimension 0 is 9223372036854775808")])
def test_bad_dimension(tmp_path, data, value, word):
    put_u64(data, tensor_fields(data, "output_norm.weight").dims, value)
    rejected(write(tmp_path, data), "tensor_dims", word)


def test_dimension_product_overflow(tmp_path, data):
    f = tensor_fields(data, "token_embd.weight")
    put_u64(data, f.dims, 2**32)
    put_u64(data, f.dims + 8, 2**32)
    rejected(write(tmp_path, data), "tensor_dims", "2^63 or more elements")


def test_row_not_multiple_of_block(tmp_path, data):
    put_u64(data, tensor_fields(data, "blk.0.attn_k.weight").dims, 48)
    rejected(write(tmp_path, data), "tensor_block", "not a multiple of the block size 32")


def test_overlapping_tensors(tmp_path, data):
    q = tensor_fields(data, "blk.0.attn_q.weight")
    k = tensor_fields(data, "blk.0.attn_k.weight")
    data[k.offset:k.offset + 8] = data[q.offset:q.offset + 8]
    rejected(write(tmp_path, data), "overlap", "blk.0.attn_q.weight", "blk.0.attn_k.weight")


def test_out_of_order_tensors(tmp_path, data):
    # Same-sized tensors swapped: in range, aligned, no overlap, yet llama.cpp refuses the layout.
    q = tensor_fields(data, "blk.0.attn_q.weight")
    k = tensor_fields(data, "blk.0.attn_k.weight")
    q_off, k_off = bytes(data[q.offset:q.offset + 8]), bytes(data[k.offset:k.offset + 8])
    data[q.offset:q.offset + 8], data[k.offset:k.offset + 8] = k_off, q_off
    rejected(write(tmp_path, data), "layout", "blk.0.attn_q.weight", "packed in order")


def test_missing_architecture(tmp_path, data):
    pos = kv_fields(data, "general.architecture").key_len + 8
    data[pos:pos + len("general.architecture")] = b"general.architecturX"
    rejected(write(tmp_path, data), "missing_key", "general.architecture")


def test_duplicate_tensor_name(tmp_path, data):
    t = tensor_fields(data, "blk.0.attn_k.weight")
    data[t.name_len + 8:t.name_len + 8 + 19] = b"blk.0.attn_q.weight"
    rejected(write(tmp_path, data), "duplicate_tensor", "blk.0.attn_q.weight")


def test_duplicate_key(tmp_path):
    path = tmp_path / "dupkey.gguf"
    w = GGUFWriter(path, "llama")
    w.add_uint32("llama.context_length", 128)
    w.add_uint32("llama.context_lengtX", 256)
    w.add_tensor("a.weight", np.zeros(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    pos = kv_fields(data, "llama.context_lengtX").key_len + 8
    data[pos:pos + 20] = b"llama.context_length"
    rejected(write(tmp_path, data), "duplicate_key", "llama.context_length")


def test_empty_key(tmp_path, data):
    # Drop the key's bytes and zero its length, so the rest of the header still parses.
    f = kv_fields(data, "llama.block_count")
    key_len = len("llama.block_count")
    del data[f.key_len + 8:f.key_len + 8 + key_len]
    put_u64(data, f.key_len, 0)
    rejected(write(tmp_path, data), "empty_key", "is empty")


def test_nested_array_and_long_tensor_name(tmp_path):
    path = tmp_path / "odd.gguf"
    w = GGUFWriter(path, "llama")
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_tensor("t" * 70, np.zeros(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert codes(path) == {"nested_array", "tensor_name"}
    rejected(path, "array of arrays", "name is 70 bytes")


def test_sha256(sample, tmp_path):
    digest = sha256_file(sample.path)
    report = check_gguf(sample.path, expected_sha256=digest.upper())
    assert report.sha256 == digest
    rejected(sample.path, "sha256", "does not match", expected_sha256="0" * 64)
    with pytest.raises(InputError):
        validate_gguf(sample.path, expected_sha256="abc")


def test_missing_file_and_directory(tmp_path):
    rejected(tmp_path / "nope.gguf", "io", "cannot read")
    rejected(tmp_path, "io", "cannot read")


def test_file_shrinking_while_read_is_reported(tmp_path, data):
    # Parse with the size seen before another process truncated the file: an error, no crash
    # (an mmap would have died with SIGBUS here).
    path = write(tmp_path, data[:300])
    report = gguf_report.GGUFReport(path=str(path))
    with open(path, "rb") as f:
        gguf_check_module._parse(f, len(data), report, gguf_report.ProblemList(report))
    assert [p.code for p in report.errors] == ["truncated"]
    assert "shrank" in report.errors[0].message


def test_trailing_bytes_warn_only(tmp_path, data):
    report = check_gguf(write(tmp_path, data + b"\0" * 4096))
    assert report.ok and [p.code for p in report.warnings] == ["trailing_bytes"]


def _sparse_model(path: Path, *, n_params: int, ggml_type: GGMLQuantizationType, ftype: LlamaFileType) -> Path:
    """Header of a big model; the data region is a sparse hole, so it costs no disk."""
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    rows = n_params // 4096
    nbytes = rows * 4096 // block * type_size
    w = GGUFWriter(path, "llama")
    w.add_file_type(int(ftype))
    w.add_tensor_info("big.weight", (rows, 4096), np.dtype(np.float32), nbytes, raw_dtype=ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    data_offset = validate_gguf(path).data_offset
    os.truncate(path, data_offset + nbytes)
    return path


def test_multi_gb_file_validates_from_headers_only(tmp_path):
    path = _sparse_model(tmp_path / "big.gguf", n_params=4_000_000_000,
                         ggml_type=GGMLQuantizationType.F16, ftype=LlamaFileType.MOSTLY_F16)
    assert path.stat().st_size > 7 * 2**30
    start = time.perf_counter()
    report = check_gguf(path)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, elapsed  # reading 8 GB, even of holes, takes seconds
    assert report.problems == [] and report.bits_per_weight == 16.0


def test_size_implausible_for_file_type_is_a_warning(tmp_path):
    # F16 data labelled Q4_K_M: the kind of mislabel a broken quantize step leaves behind.
    path = _sparse_model(tmp_path / "mislabel.gguf", n_params=200_000_000,
                         ggml_type=GGMLQuantizationType.F16, ftype=LlamaFileType.MOSTLY_Q4_K_M)
    report = check_gguf(path)
    assert report.ok
    assert [p.code for p in report.warnings] == ["size_implausible"]
    assert "Q4_K_M" in report.warnings[0].message
    honest = _sparse_model(tmp_path / "honest.gguf", n_params=200_000_000,
                           ggml_type=GGMLQuantizationType.Q4_K, ftype=LlamaFileType.MOSTLY_Q4_K_M)
    assert check_gguf(honest).problems == []


def test_llama_cpp_loads_samples_and_refuses_damage(tmp_path, sample):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = llama_cpp.Llama(model_path=str(sample.path), n_ctx=32, verbose=False)
    assert model.n_vocab() == sample.n_vocab
    model.close()
    data = bytearray(sample.path.read_bytes())
    put_u32(data, tensor_fields(data, "output_norm.weight").n_dims, 5)
    with pytest.raises(Exception):
        llama_cpp.Llama(model_path=str(write(tmp_path, data)), n_ctx=32, verbose=False)
