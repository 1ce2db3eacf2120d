"""Structural GGUF validation with our own bounded header parser.

GGUFReader trusts the file: it neither bounds counts nor checks that tensor data lies inside the
file. Here every count and length is checked against the bytes left before anything is read or
allocated, and only the header is read, through a small sliding window (no mmap: a file that
shrinks while mapped kills the process with SIGBUS), so a multi-GB file validates in milliseconds.
The rules follow ggml's own loader (gguf.cpp) so that what passes here also loads in llama.cpp.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from .errors import GGUFError, InputError
from .fsutil import sha256_file

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                      # GGML_MAX_DIMS
MAX_TENSOR_NAME = 64              # GGML_MAX_NAME: llama.cpp refuses names of 64 bytes or more
MAX_KEY_LEN = 65535               # the spec's limit for keys
MAX_STRING_LEN = 2**30            # ggml's GGUF_MAX_STRING_LENGTH; such strings are skipped, not read
MAX_KEPT_STRING = 16 * 2**20      # values we decode (general.*, chat template) are far smaller
WINDOW = 2**20
MAX_ARRAY_DEPTH = 4
MAX_TENSORS = 2**20
MAX_KVS = 2**20
MAX_PROBLEMS = 50
INT64_LIMIT = 2**63
# Below this many parameters, F32 norms and fallback quant types dominate the size, so the
# bits-per-weight comparison would only produce noise.
MIN_PARAMS_FOR_BPW_CHECK = 100_000_000

# Smallest possible encodings, used to bound counts before looping over them.
_MIN_KV_BYTES = 8 + 4 + 1         # empty key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims=0, type, offset

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALARS: dict[int, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"), GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"), GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"), GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"), GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: struct.Struct("<Q"), GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_INT_TYPES = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
              GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64}
_TYPE_SIZES: dict[int, tuple[int, int]] = {int(t): v for t, v in GGML_QUANT_SIZES.items()}
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


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "code": self.code, "message": self.message}


@dataclass
class GGUFReport:
    path: str
    size: int = 0
    version: int | None = None
    architecture: str | None = None
    name: str | None = None
    file_type: int | None = None
    file_type_name: str | None = None
    quant: str | None = None
    tensor_count: int | None = None
    kv_count: int | None = None
    parameter_count: int = 0
    quant_mix: dict[str, dict[str, int]] = field(default_factory=dict)
    bits_per_weight: float | None = None
    chat_template_present: bool = False
    context_length: int | None = None
    alignment: int | None = None
    data_offset: int | None = None
    sha256: str | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "problems"}
        data["quant_mix"] = {k: dict(v) for k, v in self.quant_mix.items()}
        data["ok"] = self.ok
        data["problems"] = [p.to_dict() for p in self.problems]
        return data


class _Stop(Exception):
    """Parsing cannot go on: the bytes after this point have no known meaning."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Array:
    elem_type: int
    count: int


@dataclass
class _TensorInfo:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int
    n_elements: int | None  # None when dims or type were invalid
    nbytes: int | None


class _Problems:
    def __init__(self, report: GGUFReport):
        self.report = report
        self.dropped = 0

    def add(self, severity: str, code: str, message: str) -> None:
        if len(self.report.problems) >= MAX_PROBLEMS:
            self.dropped += 1
            return
        self.report.problems.append(Problem(severity, code, message))

    def error(self, code: str, message: str) -> None:
        self.add("error", code, message)

    def warning(self, code: str, message: str) -> None:
        self.add("warning", code, message)

    def finish(self) -> None:
        if self.dropped:
            # Listed even past the cap, so a capped list never reads as complete.
            self.report.problems.append(
                Problem("warning", "more_problems", f"{self.dropped} more problem(s) not listed"))


class _Reader:
    """Sequential reads through a window of the file; skipped bytes are never read."""

    __slots__ = ("f", "size", "pos", "buf", "base")

    def __init__(self, f: BinaryIO, size: int):
        self.f = f
        self.size = size
        self.pos = 0
        self.buf = b""
        self.base = 0  # file offset of buf[0]

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> int:
        """Make the n bytes at pos readable; return their index in buf."""
        if n > self.size - self.pos:
            raise _Stop("truncated", f"file ends inside {what} (byte {self.pos}, need {n}, "
                                     f"{self.size - self.pos} left): truncated or corrupt")
        i = self.pos - self.base
        if i + n > len(self.buf):
            self.load(n)
            i = 0
        return i

    def load(self, n: int) -> None:
        self.f.seek(self.pos)
        data = self.f.read(min(max(n, WINDOW), self.size - self.pos))
        if len(data) < n:
            raise _Stop("truncated", f"file shrank to {self.pos + len(data)} bytes while being read")
        self.buf, self.base = data, self.pos

    def u32(self, what: str) -> int:
        i = self.need(4, what)
        self.pos += 4
        return _U32.unpack_from(self.buf, i)[0]

    def u64(self, what: str) -> int:
        i = self.need(8, what)
        self.pos += 8
        return _U64.unpack_from(self.buf, i)[0]

    def string_bytes(self, what: str, cap: int) -> bytes:
        n = self._string_length(what, cap)
        i = self.need(n, what)
        self.pos += n
        return self.buf[i:i + n]

    def skip_string(self, what: str) -> None:
        n = self._string_length(what, MAX_STRING_LEN)  # moves pos past the length field
        self.pos += n

    def _string_length(self, what: str, cap: int) -> int:
        n = self.u64(f"{what} length")
        if n > cap:
            raise _Stop("string_length", f"{what} has string length {n}, over the limit of {cap}")
        if n > self.size - self.pos:
            raise _Stop("string_length", f"{what} has string length {n} but only "
                                         f"{self.size - self.pos} bytes are left in the file")
        return n


def _type_name(t: int) -> str:
    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"TYPE_{t}"


def _file_type_name(ft: int) -> str:
    try:
        return LlamaFileType(ft).name
    except ValueError:
        return f"FTYPE_{ft}"


def _vtype_name(t: int) -> str:
    try:
        return GGUFValueType(t).name
    except ValueError:
        return f"type {t}"


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


# Values worth decoding for the report; every other value is skipped without a copy.
def _wanted(key: str) -> bool:
    return key.startswith("general.") or key.endswith(".context_length") or key == "tokenizer.chat_template"


def _read_value(r: _Reader, vtype: int, what: str, keep: bool, depth: int, probs: _Problems) -> Any:
    fixed = _SCALARS.get(vtype)
    if fixed is not None:
        i = r.need(fixed.size, what)
        r.pos += fixed.size
        return fixed.unpack_from(r.buf, i)[0] if keep else None
    if vtype == GGUFValueType.STRING:
        if keep:
            return _decode(r.string_bytes(what, MAX_KEPT_STRING))
        r.skip_string(what)
        return None
    if vtype == GGUFValueType.ARRAY:
        return _read_array(r, what, depth, probs)
    raise _Stop("kv_type", f"{what} has unknown GGUF value type {vtype}")


def _read_array(r: _Reader, what: str, depth: int, probs: _Problems) -> _Array:
    if depth >= MAX_ARRAY_DEPTH:
        raise _Stop("array_depth", f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
    etype = r.u32(f"{what} element type")
    count = r.u64(f"{what} element count")
    if etype in _SCALARS:
        min_size = _SCALARS[etype].size
    elif etype == GGUFValueType.STRING:
        min_size = 8
    elif etype == GGUFValueType.ARRAY:
        min_size = 12
    else:
        raise _Stop("kv_type", f"{what} is an array of unknown GGUF value type {etype}")
    if count > r.left // min_size:
        raise _Stop("array_length", f"{what} claims {count} elements but only {r.left} bytes "
                                    "are left in the file")
    if etype in _SCALARS:
        r.pos += count * min_size
    elif etype == GGUFValueType.STRING:
        _skip_strings(r, what, count)
    else:
        if depth == 0:
            probs.error("nested_array", f"{what} is an array of arrays, which llama.cpp's loader rejects")
        for i in range(count):
            _read_array(r, f"{what}[{i}]", depth + 1, probs)
    return _Array(etype, count)


def _skip_strings(r: _Reader, what: str, count: int) -> None:
    # Inlined: vocabularies hold 100k+ strings and this loop is most of the parse time.
    unpack, size = _U64.unpack_from, r.size
    buf, base, pos = r.buf, r.base, r.pos
    for i in range(count):
        j = pos - base
        if j + 8 > len(buf):
            r.pos = pos
            j = r.need(8, f"{what}[{i}] length")
            buf, base = r.buf, r.base
        n = unpack(buf, j)[0]
        pos += 8
        if n > size - pos or n > MAX_STRING_LEN:
            raise _Stop("string_length", f"{what}[{i}] has string length {n} but only "
                                         f"{size - pos} bytes are left in the file")
        pos += n
    r.pos = pos


def _read_header(r: _Reader, report: GGUFReport) -> tuple[int, int]:
    i = r.need(4, "the magic")
    magic = r.buf[i:i + 4]
    if magic != MAGIC:
        raise _Stop("magic", f"not a GGUF file: magic is {magic!r}, expected b'GGUF'")
    r.pos = 4
    version = r.u32("the version")
    report.version = version
    if version not in SUPPORTED_VERSIONS:
        hint = ""
        if version and version & 0xFFFF == 0:
            hint = " (a big-endian file?)"
        elif version == 1:
            hint = " (GGUFv1 is no longer supported by llama.cpp)"
        raise _Stop("version", f"unsupported GGUF version {version}{hint}; supported: 2, 3")
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the key/value count")
    report.tensor_count, report.kv_count = n_tensors, n_kv
    if n_tensors > MAX_TENSORS or n_tensors > r.left // _MIN_TENSOR_INFO_BYTES:
        raise _Stop("tensor_count", f"header claims {n_tensors} tensors, impossible for a "
                                    f"{r.size}-byte file (or over the limit of {MAX_TENSORS})")
    if n_kv > MAX_KVS or n_kv > r.left // _MIN_KV_BYTES:
        raise _Stop("kv_count", f"header claims {n_kv} key/value pairs, impossible for a "
                                f"{r.size}-byte file (or over the limit of {MAX_KVS})")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > r.left:
        raise _Stop("kv_count", f"header claims {n_kv} key/value pairs and {n_tensors} tensors, "
                                f"more than a {r.size}-byte file can hold")
    return n_tensors, n_kv


def _read_kvs(r: _Reader, n_kv: int, probs: _Problems) -> dict[str, tuple[int, Any]]:
    kvs: dict[str, tuple[int, Any]] = {}
    seen: set[bytes] = set()
    for i in range(n_kv):
        raw_key = r.string_bytes(f"key #{i}", MAX_KEY_LEN)
        key = _decode(raw_key)
        if not raw_key:
            probs.error("empty_key", f"key #{i} is empty")
        elif raw_key in seen:
            probs.error("duplicate_key", f"duplicate key {key!r}")
        seen.add(raw_key)
        vtype = r.u32(f"the value type of key {key!r}")
        value = _read_value(r, vtype, f"the value of key {key!r}", _wanted(key), 0, probs)
        if vtype == GGUFValueType.ARRAY or _wanted(key):
            kvs.setdefault(key, (vtype, value))
    return kvs


def _read_tensor_infos(r: _Reader, n_tensors: int, probs: _Problems) -> list[_TensorInfo]:
    infos: list[_TensorInfo] = []
    seen: set[bytes] = set()
    for i in range(n_tensors):
        raw = r.string_bytes(f"tensor #{i} name", MAX_KEPT_STRING)
        name = _decode(raw)
        if len(raw) >= MAX_TENSOR_NAME:
            probs.error("tensor_name", f"tensor #{i} name is {len(raw)} bytes; llama.cpp allows "
                                       f"at most {MAX_TENSOR_NAME - 1}")
        if raw in seen:
            probs.error("duplicate_tensor", f"duplicate tensor name {name!r}")
        seen.add(raw)
        n_dims = r.u32(f"tensor {name!r} n_dims")
        if n_dims > MAX_DIMS:
            raise _Stop("n_dims", f"tensor {name!r} has n_dims={n_dims}, "
                                  f"more than GGML's maximum of {MAX_DIMS}")
        dims = tuple(r.u64(f"tensor {name!r} dimensions") for _ in range(n_dims))
        gtype = r.u32(f"tensor {name!r} type")
        offset = r.u64(f"tensor {name!r} offset")
        infos.append(_tensor_info(name, dims, gtype, offset, probs))
    return infos


def _tensor_info(name: str, dims: tuple[int, ...], gtype: int, offset: int,
                 probs: _Problems) -> _TensorInfo:
    n_elements: int | None = 1
    for j, d in enumerate(dims):
        if d == 0 or d >= INT64_LIMIT:
            probs.error("tensor_dims", f"tensor {name!r} dimension {j} is {d}; must be in 1..2^63-1")
            n_elements = None
            break
        n_elements *= d
        if n_elements >= INT64_LIMIT:
            probs.error("tensor_dims", f"tensor {name!r} shape {list(dims)} has 2^63 or more elements")
            n_elements = None
            break
    nbytes = None
    sizes = _TYPE_SIZES.get(gtype)
    if sizes is None:
        probs.error("tensor_type", f"tensor {name!r} has unknown ggml type {gtype}")
    elif n_elements is not None:
        block, type_size = sizes
        row = dims[0] if dims else 1
        if row % block:
            probs.error("tensor_block", f"tensor {name!r} of type {_type_name(gtype)} has {row} "
                                        f"elements per row, not a multiple of the block size {block}")
        else:
            nbytes = n_elements // block * type_size
    return _TensorInfo(name, dims, gtype, offset, n_elements, nbytes)


def _check_key_types(kvs: dict[str, tuple[int, Any]], report: GGUFReport, probs: _Problems) -> int | None:
    """Fill report fields from well-known keys; returns the data alignment, or None if unusable."""
    arch = kvs.get("general.architecture")
    if arch is None:
        probs.error("missing_key", "required key 'general.architecture' is missing")
    elif arch[0] != GGUFValueType.STRING or not arch[1]:
        probs.error("key_type", "'general.architecture' must be a non-empty string, "
                                f"got {_vtype_name(arch[0])}")
    else:
        report.architecture = arch[1]
    name = kvs.get("general.name")
    if name and name[0] == GGUFValueType.STRING:
        report.name = name[1]
    ft = kvs.get("general.file_type")
    if ft is not None:
        if ft[0] in _INT_TYPES:
            report.file_type = int(ft[1])
            report.file_type_name = _file_type_name(report.file_type)
            if ft[0] != GGUFValueType.UINT32:
                probs.warning("key_type", f"'general.file_type' is {_vtype_name(ft[0])}, expected UINT32")
        else:
            probs.warning("key_type", f"'general.file_type' is {_vtype_name(ft[0])}, expected UINT32")
    tmpl = kvs.get("tokenizer.chat_template")
    report.chat_template_present = bool(tmpl and tmpl[0] == GGUFValueType.STRING and tmpl[1])
    if report.architecture:
        ctx = kvs.get(f"{report.architecture}.context_length")
        if ctx and ctx[0] in _INT_TYPES:
            report.context_length = int(ctx[1])
    align = kvs.get("general.alignment")
    if align is None:
        report.alignment = DEFAULT_ALIGNMENT
        return DEFAULT_ALIGNMENT
    if align[0] != GGUFValueType.UINT32:
        # llama.cpp reads it with gguf_get_val_u32, which aborts on any other type.
        probs.error("alignment", f"'general.alignment' is {_vtype_name(align[0])}, must be UINT32")
        return None
    value = align[1]
    report.alignment = value
    if value == 0 or value & (value - 1):
        probs.error("alignment", f"alignment {value} is not a power of two")
        return None
    return value


def _check_layout(infos: list[_TensorInfo], data_start: int, alignment: int, size: int,
                  probs: _Problems) -> None:
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
        expected += _pad(ti.nbytes or 0, alignment)
    if infos and size - (data_start + expected) > alignment:
        probs.warning("trailing_bytes", f"{size - data_start - expected} bytes after the last tensor")


def _summarise(infos: list[_TensorInfo], report: GGUFReport, probs: _Problems) -> None:
    mix: dict[str, dict[str, int]] = {}
    params = nbytes = 0
    for ti in infos:
        if ti.nbytes is None or ti.n_elements is None:
            continue
        entry = mix.setdefault(_type_name(ti.ggml_type), {"tensors": 0, "params": 0, "bytes": 0})
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


def _check_bpw(report: GGUFReport, probs: _Problems) -> None:
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


def _parse(f: BinaryIO, size: int, report: GGUFReport, probs: _Problems) -> None:
    r = _Reader(f, size)
    infos: list[_TensorInfo] = []
    try:
        n_tensors, n_kv = _read_header(r, report)
        kvs = _read_kvs(r, n_kv, probs)
        alignment = _check_key_types(kvs, report, probs)
        infos = _read_tensor_infos(r, n_tensors, probs)
    except _Stop as stop:
        probs.error(stop.code, stop.message)
        _summarise(infos, report, probs)
        return
    if alignment is not None:
        report.data_offset = _pad(r.pos, alignment)
        _check_layout(infos, report.data_offset, alignment, size, probs)
    _summarise(infos, report, probs)


def validate_gguf(path: str | os.PathLike, *, expected_sha256: str | None = None) -> GGUFReport:
    """Check a GGUF file's structure; never raises for problems in the file, returns them."""
    if expected_sha256 is not None and not _HEX64.match(expected_sha256):
        raise InputError(f"expected sha256 {expected_sha256!r} is not 64 hex digits")
    report = GGUFReport(path=str(path))
    probs = _Problems(report)
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


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


def render_report(report: GGUFReport):
    """A rich renderable for `loradeploy inspect`."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    status = Text("OK", style="bold green") if report.ok else Text("INVALID", style="bold red")
    info = Table(show_header=False, box=None, pad_edge=False)
    info.add_column(style="bold")
    info.add_column()
    ft = f"{report.file_type} ({report.file_type_name})" if report.file_type is not None else "-"
    rows = [
        ("file", report.path), ("status", status),
        ("size", f"{_human_bytes(report.size)} ({report.size} bytes)"),
        ("version", report.version), ("architecture", report.architecture), ("name", report.name),
        ("file type", ft), ("quant", report.quant), ("tensors", report.tensor_count),
        ("key/values", report.kv_count), ("parameters", f"{report.parameter_count:,}"),
        ("bits/weight", report.bits_per_weight), ("context length", report.context_length),
        ("chat template", "yes" if report.chat_template_present else "no"),
        ("alignment", report.alignment),
    ]
    if report.sha256:
        rows.append(("sha256", report.sha256))
    for label, value in rows:
        info.add_row(label, value if isinstance(value, Text) else ("-" if value is None else str(value)))
    parts: list[Any] = [info]
    if report.quant_mix:
        mix = Table(title="tensor types")
        for col in ("type", "tensors", "params", "bytes"):
            mix.add_column(col, justify="left" if col == "type" else "right")
        for tname, entry in report.quant_mix.items():
            mix.add_row(tname, str(entry["tensors"]), f"{entry['params']:,}", _human_bytes(entry["bytes"]))
        parts.append(mix)
    if report.problems:
        probs = Table(title="problems")
        probs.add_column("severity")
        probs.add_column("code")
        probs.add_column("message", overflow="fold")
        for p in report.problems:
            style = "red" if p.severity == "error" else "yellow"
            probs.add_row(Text(p.severity, style=style), p.code, p.message)
        parts.append(probs)
    return Group(*parts)
