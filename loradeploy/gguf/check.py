"""Structural GGUF validation: header keys, tensor layout as llama.cpp's loader demands it, the
quant mix and whether the size fits the labelled type. Problems are returned, not raised, except
by check_gguf, the gate the stages use."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGUFValueType

from ..errors import GGUFError, InputError
from ..fsutil import sha256_file
from .reader import (DEFAULT_ALIGNMENT, INT_TYPES, Reader, Stop, TensorInfo, file_type_name, pad, read_header,
                     read_kvs, read_tensor_infos, type_name, vtype_name)
from .report import GGUFReport, ProblemList

# Below this many parameters, F32 norms and fallback quant types dominate the size, so the
# bits-per-weight comparison would only produce noise.
MIN_PARAMS_FOR_BPW_CHECK = 100_000_000
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")

# Typical bits per weight llama.cpp reports for 7B-class models; the accepted band around these
# is wide on purpose (embeddings, output layers and fallback types shift real files).
NOMINAL_BPW: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.67,
    "Q5_K_S": 5.52, "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_0": 4.55,
    "Q4_1": 5.0, "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q2_K": 2.96, "Q2_K_S": 2.6,
    "IQ4_XS": 4.25, "IQ4_NL": 4.5, "IQ3_M": 3.66, "IQ3_S": 3.44, "IQ3_XS": 3.3, "IQ3_XXS": 3.06,
    "IQ2_M": 2.7, "IQ2_S": 2.5, "IQ2_XS": 2.31, "IQ2_XXS": 2.06, "IQ1_M": 1.75, "IQ1_S": 1.56,
    "TQ1_0": 1.69, "TQ2_0": 2.06, "MXFP4_MOE": 4.25,
}


def bpw_range(label: str) -> tuple[float, float] | None:
    nominal = NOMINAL_BPW.get(label)
    if nominal is None:
        return None
    return nominal * 0.75, nominal * 1.5 + 1.0


def _check_key_types(kvs: dict[str, tuple[int, Any]], report: GGUFReport, probs: ProblemList) -> int | None:
    """Fill report fields from well-known keys; returns the data alignment, or None if unusable."""
    arch = kvs.get("general.architecture")
    if arch is None:
        probs.error("missing_key", "required key 'general.architecture' is missing")
    elif arch[0] != GGUFValueType.STRING or not arch[1]:
        probs.error("key_type", "'general.architecture' must be a non-empty string, "
                                f"got {vtype_name(arch[0])}")
    else:
        report.architecture = arch[1]
    name = kvs.get("general.name")
    if name and name[0] == GGUFValueType.STRING:
        report.name = name[1]
    ft = kvs.get("general.file_type")
    if ft is not None:
        if ft[0] in INT_TYPES:
            report.file_type = int(ft[1])
            report.file_type_name = file_type_name(report.file_type)
            if ft[0] != GGUFValueType.UINT32:
                probs.warning("key_type", f"'general.file_type' is {vtype_name(ft[0])}, expected UINT32")
        else:
            probs.warning("key_type", f"'general.file_type' is {vtype_name(ft[0])}, expected UINT32")
    tmpl = kvs.get("tokenizer.chat_template")
    report.chat_template_present = bool(tmpl and tmpl[0] == GGUFValueType.STRING and tmpl[1])
    if report.architecture:
        ctx = kvs.get(f"{report.architecture}.context_length")
        if ctx and ctx[0] in INT_TYPES:
            report.context_length = int(ctx[1])
    align = kvs.get("general.alignment")
    if align is None:
        report.alignment = DEFAULT_ALIGNMENT
        return DEFAULT_ALIGNMENT
    if align[0] != GGUFValueType.UINT32:
        # llama.cpp reads it with gguf_get_val_u32, which aborts on any other type.
        probs.error("alignment", f"'general.alignment' is {vtype_name(align[0])}, must be UINT32")
        return None
    value = align[1]
    report.alignment = value
    if value == 0 or value & (value - 1):
        probs.error("alignment", f"alignment {value} is not a power of two")
        return None
    return value


def _check_layout(infos: list[TensorInfo], data_start: int, alignment: int, size: int,
                  probs: ProblemList) -> None:
    placed: list[tuple[int, int, str]] = []
    clean = True
    for ti in infos:
        if ti.offset % alignment:
            probs.error("misaligned", f"tensor {ti.name!r} offset {ti.offset} is not a multiple of "
                                      f"the alignment {alignment}")
            clean = False
        if ti.nbytes is None:
            clean = False
            continue
        start = data_start + ti.offset
        end = start + ti.nbytes
        if end > size:
            probs.error("data_range", f"tensor {ti.name!r} data [{start}, {end}) runs past the end "
                                      f"of the {size}-byte file: truncated or corrupt offset")
            clean = False
            continue
        placed.append((start, end, ti.name))
    placed.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(placed, placed[1:]):
        if s1 < e0:
            probs.error("overlap", f"tensors {n0!r} [{s0}, {e0}) and {n1!r} [{s1}, {e1}) overlap")
            clean = False
    if not clean:
        return
    # ggml's loader insists on tensors packed in file order, each padded to the alignment.
    expected = 0
    for ti in infos:
        if ti.offset != expected:
            probs.error("layout", f"tensor {ti.name!r} has offset {ti.offset}, llama.cpp expects "
                                  f"{expected} (tensors must be packed in order)")
            return
        expected += pad(ti.nbytes or 0, alignment)
    if infos and size - (data_start + expected) > alignment:
        probs.warning("trailing_bytes", f"{size - data_start - expected} bytes after the last tensor")


def _summarise(infos: list[TensorInfo], report: GGUFReport, probs: ProblemList) -> None:
    mix: dict[str, dict[str, int]] = {}
    params = nbytes = 0
    for ti in infos:
        if ti.nbytes is None or ti.n_elements is None:
            continue
        entry = mix.setdefault(type_name(ti.ggml_type), {"tensors": 0, "params": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["params"] += ti.n_elements
        entry["bytes"] += ti.nbytes
        params += ti.n_elements
        nbytes += ti.nbytes
    report.quant_mix = dict(sorted(mix.items(), key=lambda kv: -kv[1]["bytes"]))
    report.parameter_count = params
    report.bits_per_weight = round(nbytes * 8 / params, 3) if params else None
    if report.file_type_name is not None:
        name = report.file_type_name
        report.quant = name.removeprefix("MOSTLY_").removeprefix("ALL_")
    elif mix:
        # No general.file_type: name the type holding most of the bytes.
        report.quant = next(iter(report.quant_mix))
    if report.tensor_count == 0:
        probs.warning("no_tensors", "the file has no tensors (a vocab-only file?)")
    _check_bpw(report, probs)


def _check_bpw(report: GGUFReport, probs: ProblemList) -> None:
    if report.bits_per_weight is None or report.parameter_count < MIN_PARAMS_FOR_BPW_CHECK:
        return
    band = bpw_range(report.quant or "") if report.file_type is not None else None
    if band is None:
        return
    low, high = band
    if not low <= report.bits_per_weight <= high:
        probs.warning("size_implausible",
                      f"{report.bits_per_weight:.2f} bits per weight is outside {low:.1f}..{high:.1f}, "
                      f"expected for {report.quant}: file_type may be wrong or the file mislabelled")


def _parse(f: BinaryIO, size: int, report: GGUFReport, probs: ProblemList) -> None:
    r = Reader(f, size)
    infos: list[TensorInfo] = []
    try:
        n_tensors, n_kv = read_header(r, report)
        kvs = read_kvs(r, n_kv, probs)
        alignment = _check_key_types(kvs, report, probs)
        infos = read_tensor_infos(r, n_tensors, probs)
    except Stop as stop:
        probs.error(stop.code, stop.message)
        _summarise(infos, report, probs)
        return
    if alignment is not None:
        report.data_offset = pad(r.pos, alignment)
        _check_layout(infos, report.data_offset, alignment, size, probs)
    _summarise(infos, report, probs)


def validate_gguf(path: str | os.PathLike, *, expected_sha256: str | None = None) -> GGUFReport:
    """Check a GGUF file's structure; never raises for problems in the file, returns them."""
    if expected_sha256 is not None and not _HEX64.match(expected_sha256):
        raise InputError(f"expected sha256 {expected_sha256!r} is not 64 hex digits")
    report = GGUFReport(path=str(path))
    probs = ProblemList(report)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            report.size = size
            if size == 0:
                probs.error("truncated", "file is empty")
            else:
                _parse(f, size, report, probs)
    except OSError as exc:
        probs.error("io", f"cannot read {path}: {exc.strerror or exc}")
        probs.finish()
        return report
    if expected_sha256 is not None:
        report.sha256 = sha256_file(Path(path))
        if report.sha256.lower() != expected_sha256.lower():
            probs.error("sha256", f"sha256 {report.sha256} does not match the expected "
                                  f"{expected_sha256.lower()}")
    probs.finish()
    return report


def check_gguf(path: str | os.PathLike, **kw: Any) -> GGUFReport:
    """Like validate_gguf, but raise GGUFError naming the first problems if any is an error."""
    report = validate_gguf(path, **kw)
    errors = report.errors
    if errors:
        listed = "; ".join(f"{p.code}: {p.message}" for p in errors[:3])
        more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
        raise GGUFError(f"{path} is not a valid GGUF: {listed}{more}",
                        hint="re-run the convert/quantize stage or re-fetch the file")
    return report
