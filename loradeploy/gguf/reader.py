"""A bounded GGUF header parser.

GGUFReader trusts the file: it neither bounds counts nor checks that tensor data lies inside the
file. Here every count and length is checked against the bytes left before anything is read or
allocated, and only the header is read, through a small sliding window (no mmap: a file that
shrinks while mapped kills the process with SIGBUS), so a multi-GB file validates in milliseconds.
The rules follow ggml's own loader (gguf.cpp) so that what passes here also loads in llama.cpp.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from .report import GGUFReport, ProblemList

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
INT64_LIMIT = 2**63

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
INT_TYPES = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
             GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64}
_TYPE_SIZES: dict[int, tuple[int, int]] = {int(t): v for t, v in GGML_QUANT_SIZES.items()}


class Stop(Exception):
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
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int
    n_elements: int | None  # None when dims or type were invalid
    nbytes: int | None


class Reader:
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
            raise Stop("truncated", f"file ends inside {what} (byte {self.pos}, need {n}, "
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
            raise Stop("truncated", f"file shrank to {self.pos + len(data)} bytes while being read")
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
            raise Stop("string_length", f"{what} has string length {n}, over the limit of {cap}")
        if n > self.size - self.pos:
            raise Stop("string_length", f"{what} has string length {n} but only "
                                        f"{self.size - self.pos} bytes are left in the file")
        return n


def _enum_name(enum, value: int, unknown: str) -> str:
    # files carry numbers newer (or more broken) than the gguf module knows; name them, never raise
    try:
        return enum(value).name
    except ValueError:
        return unknown


def type_name(t: int) -> str:
    return _enum_name(GGMLQuantizationType, t, f"TYPE_{t}")


def file_type_name(ft: int) -> str:
    return _enum_name(LlamaFileType, ft, f"FTYPE_{ft}")


def vtype_name(t: int) -> str:
    return _enum_name(GGUFValueType, t, f"type {t}")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


# Values worth decoding for the report; every other value is skipped without a copy.
def _wanted(key: str) -> bool:
    return key.startswith("general.") or key.endswith(".context_length") or key == "tokenizer.chat_template"


def _read_value(r: Reader, vtype: int, what: str, keep: bool, depth: int, probs: ProblemList) -> Any:
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
    raise Stop("kv_type", f"{what} has unknown GGUF value type {vtype}")


def _read_array(r: Reader, what: str, depth: int, probs: ProblemList) -> _Array:
    if depth >= MAX_ARRAY_DEPTH:
        raise Stop("array_depth", f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
    etype = r.u32(f"{what} element type")
    count = r.u64(f"{what} element count")
    if etype in _SCALARS:
        min_size = _SCALARS[etype].size
    elif etype == GGUFValueType.STRING:
        min_size = 8
    elif etype == GGUFValueType.ARRAY:
        min_size = 12
    else:
        raise Stop("kv_type", f"{what} is an array of unknown GGUF value type {etype}")
    if count > r.left // min_size:
        raise Stop("array_length", f"{what} claims {count} elements but only {r.left} bytes "
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


def _skip_strings(r: Reader, what: str, count: int) -> None:
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
            raise Stop("string_length", f"{what}[{i}] has string length {n} but only "
                                        f"{size - pos} bytes are left in the file")
        pos += n
    r.pos = pos


def read_header(r: Reader, report: GGUFReport) -> tuple[int, int]:
    i = r.need(4, "the magic")
    magic = r.buf[i:i + 4]
    if magic != MAGIC:
        raise Stop("magic", f"not a GGUF file: magic is {magic!r}, expected b'GGUF'")
    r.pos = 4
    version = r.u32("the version")
    report.version = version
    if version not in SUPPORTED_VERSIONS:
        hint = ""
        if version and version & 0xFFFF == 0:
            hint = " (a big-endian file?)"
        elif version == 1:
            hint = " (GGUFv1 is no longer supported by llama.cpp)"
        raise Stop("version", f"unsupported GGUF version {version}{hint}; supported: 2, 3")
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the key/value count")
    report.tensor_count, report.kv_count = n_tensors, n_kv
    if n_tensors > MAX_TENSORS or n_tensors > r.left // _MIN_TENSOR_INFO_BYTES:
        raise Stop("tensor_count", f"header claims {n_tensors} tensors, impossible for a "
                                   f"{r.size}-byte file (or over the limit of {MAX_TENSORS})")
    if n_kv > MAX_KVS or n_kv > r.left // _MIN_KV_BYTES:
        raise Stop("kv_count", f"header claims {n_kv} key/value pairs, impossible for a "
                               f"{r.size}-byte file (or over the limit of {MAX_KVS})")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > r.left:
        raise Stop("kv_count", f"header claims {n_kv} key/value pairs and {n_tensors} tensors, "
                               f"more than a {r.size}-byte file can hold")
    return n_tensors, n_kv


def read_kvs(r: Reader, n_kv: int, probs: ProblemList) -> dict[str, tuple[int, Any]]:
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


def read_tensor_infos(r: Reader, n_tensors: int, probs: ProblemList) -> list[TensorInfo]:
    infos: list[TensorInfo] = []
    seen: set[bytes] = set()
    for i in range(n_tensors):
        n = r._string_length(f"tensor #{i} name", MAX_KEPT_STRING)
        if n >= MAX_TENSOR_NAME:
            # a corrupt length can make the "name" a big slice of the file: only its start is read
            # (every message below names the tensor), the rest is skipped unread
            probs.error("tensor_name", f"tensor #{i} name is {n} bytes; llama.cpp allows "
                                       f"at most {MAX_TENSOR_NAME - 1}")
            j = r.need(MAX_TENSOR_NAME, f"tensor #{i} name")
            raw = r.buf[j:j + MAX_TENSOR_NAME] + b"%d" % n
            name = _decode(raw[:MAX_TENSOR_NAME]) + f"...({n} bytes)"
            r.pos += n
        else:
            j = r.need(n, f"tensor #{i} name")
            raw = r.buf[j:j + n]
            r.pos += n
            name = _decode(raw)
        if raw in seen:
            probs.error("duplicate_tensor", f"duplicate tensor name {name!r}")
        seen.add(raw)
        n_dims = r.u32(f"tensor {name!r} n_dims")
        if n_dims > MAX_DIMS:
            raise Stop("n_dims", f"tensor {name!r} has n_dims={n_dims}, "
                                 f"more than GGML's maximum of {MAX_DIMS}")
        dims = tuple(r.u64(f"tensor {name!r} dimensions") for _ in range(n_dims))
        gtype = r.u32(f"tensor {name!r} type")
        offset = r.u64(f"tensor {name!r} offset")
        infos.append(_tensor_info(name, dims, gtype, offset, probs))
    return infos


def _tensor_info(name: str, dims: tuple[int, ...], gtype: int, offset: int,
                 probs: ProblemList) -> TensorInfo:
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
            probs.error("tensor_block", f"tensor {name!r} of type {type_name(gtype)} has {row} "
                                        f"elements per row, not a multiple of the block size {block}")
        else:
            nbytes = n_elements // block * type_size
    return TensorInfo(name, dims, gtype, offset, n_elements, nbytes)
