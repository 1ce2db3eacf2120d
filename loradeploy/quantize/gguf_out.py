"""GGUF in and out, laid out exactly as llama_model_quantize writes it.

What llama.cpp (gguf.cpp, llama-quant.cpp of the pinned version) does, and so what this does:
- every key/value of the input is copied in order, except that setting a key removes it and
  appends it: ``general.quantization_version`` (2) and then ``general.file_type`` end up last; the
  ``split.*`` keys are dropped;
- tensors are ordered by llama_model_loader's weights_map: layer number first (tensors outside
  ``blk.N.`` count as layer -1), then name;
- a tensor's dimension count is ggml_n_dims (trailing 1s dropped, at least 1); data offsets are
  padded to 32 bytes and the header is zero-padded to 32 as well.
The raw bytes of each key/value are kept, so strings, arrays and floats round-trip unchanged.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

ALIGNMENT = 32          # GGUF_DEFAULT_ALIGNMENT: llama.cpp's output context always uses it
QNT_VERSION = 2         # GGML_QNT_VERSION
GGUF_VERSION = 3
_DROP_KEYS = {"general.quantization_version", "general.file_type", "split.no", "split.count",
              "split.tensors.count"}

# ggml type id -> (values per block, bytes per block), for the types this engine reads or writes
TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 30: (1, 2),              # F32, F16, BF16
    2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),     # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),  # Q2_K..Q6_K
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),   # the IQ types
    22: (256, 82), 23: (256, 136), 29: (256, 56),
}
TYPE_NAMES = {0: "F32", 1: "F16", 30: "BF16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
              10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
# written only where a tensor-type recipe names them (ggml's own quantizer, with or without an imatrix)
IQ_NAMES = {16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
            23: "IQ4_XS", 29: "IQ1_M"}
ALL_TYPE_NAMES = {**TYPE_NAMES, **IQ_NAMES}


def type_name(ggml_type: int) -> str:
    return ALL_TYPE_NAMES.get(ggml_type, str(ggml_type))

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")  # like sscanf("blk.%d."): the number counts even without its dot


class GGUFFormatError(ValueError):
    pass


def row_bytes(ggml_type: int, n_per_row: int) -> int:
    blck, size = TYPE_SIZES[ggml_type]
    return n_per_row // blck * size


def pad(n: int, align: int = ALIGNMENT) -> int:
    return (n + align - 1) // align * align


@dataclass
class Tensor:
    name: str
    ne: tuple[int, ...]        # ggml order: ne[0] is the row length
    ggml_type: int
    offset: int                # relative to the data section
    rows: int = 0
    n_per_row: int = 0

    def __post_init__(self) -> None:
        self.n_per_row = self.ne[0]
        self.rows = 1
        for d in self.ne[1:]:
            self.rows *= d

    @property
    def n_elements(self) -> int:
        return self.rows * self.n_per_row

    def nbytes(self, ggml_type: int | None = None) -> int:
        return self.rows * row_bytes(self.ggml_type if ggml_type is None else ggml_type, self.n_per_row)


@dataclass
class SourceGGUF:
    path: Path
    kvs: list[tuple[str, bytes]]           # key -> raw encoded entry (key, type, value)
    values: dict[str, object]              # decoded scalars and strings (arrays: their length)
    tensors: list[Tensor]
    data_start: int
    alignment: int = ALIGNMENT
    by_name: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {t.name: t for t in self.tensors}

    @property
    def arch(self) -> str:
        return str(self.values.get("general.architecture", ""))

    def get(self, key: str, default=None):
        return self.values.get(key, default)


class _Buf:
    def __init__(self, f):
        self.f = f

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFFormatError("truncated GGUF header")
        return b

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> tuple[bytes, str]:
        raw_len = self.take(8)
        n = struct.unpack("<Q", raw_len)[0]
        if n > 1 << 30:
            raise GGUFFormatError("implausible string length")
        raw = self.take(n)
        return raw_len + raw, raw.decode("utf-8", errors="replace")


def _value(buf: _Buf, vtype: int) -> tuple[bytes, object]:
    if vtype == _STRING:
        return buf.string()
    if vtype == _BOOL:  # ggml rewrites a bool as 0/1
        v = buf.take(1)[0] != 0
        return bytes([int(v)]), v
    if vtype in _SCALAR:
        fmt = "<" + _SCALAR[vtype]
        raw = buf.take(struct.calcsize(fmt))
        return raw, struct.unpack(fmt, raw)[0]
    if vtype == _ARRAY:
        head = buf.take(12)
        etype, count = struct.unpack("<IQ", head)
        if etype == _ARRAY:
            raise GGUFFormatError("nested arrays are not valid GGUF")
        if etype in _SCALAR and etype != _BOOL:
            return head + buf.take(count * struct.calcsize("<" + _SCALAR[etype])), count
        parts = [head] + [_value(buf, etype)[0] for _ in range(count)]
        return b"".join(parts), count
    raise GGUFFormatError(f"unknown GGUF value type {vtype}")


def read_source(path: Path) -> SourceGGUF:
    """The header of a GGUF: raw key/values, decoded scalars, tensor infos, data offset."""
    path = Path(path)
    with open(path, "rb") as f:
        buf = _Buf(f)
        if buf.take(4) != b"GGUF":
            raise GGUFFormatError(f"{path} is not a GGUF file")
        version = buf.u32()
        if version != GGUF_VERSION:
            raise GGUFFormatError(f"GGUF version {version} (only {GGUF_VERSION} is written the same way)")
        n_tensors, n_kv = buf.u64(), buf.u64()
        kvs, values = [], {}
        for _ in range(n_kv):
            raw_key, key = buf.string()
            raw_type = buf.take(4)
            raw_val, val = _value(buf, struct.unpack("<I", raw_type)[0])
            kvs.append((key, raw_key + raw_type + raw_val))
            values[key] = val
        tensors = []
        for _ in range(n_tensors):
            _, name = buf.string()
            n_dims = buf.u32()
            ne = tuple(buf.u64() for _ in range(n_dims))
            ttype, offset = buf.u32(), buf.u64()
            tensors.append(Tensor(name, ne or (1,), ttype, offset))
        align = int(values.get("general.alignment", ALIGNMENT))
        data_start = pad(f.tell(), align)
    return SourceGGUF(path, kvs, values, tensors, data_start, align)


def _layer(name: str) -> int:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def loader_order(tensors: list[Tensor]) -> list[Tensor]:
    """llama_model_loader's weights_map order (sscanf of ``blk.%d.``, then the name's bytes)."""
    return sorted(tensors, key=lambda t: (_layer(t.name), t.name.encode()))


def n_dims(ne: tuple[int, ...]) -> int:
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def u32_kv(key: str, value: int) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<II", 4, value)


def str_kv(key: str, value: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", _STRING, len(value)) + value


def header(src: SourceGGUF, order: list[Tensor], types: list[int], ftype: int,
           extra: tuple[tuple[str, bytes], ...] = ()) -> tuple[bytes, list[int]]:
    """The output's header bytes (padded) and each tensor's data size, for tensors ``order`` with
    output types ``types``. ``extra`` (key, encoded entry) are set after general.file_type, as
    llama-quantize sets its --imatrix keys (a key set again moves to the end)."""
    drop = _DROP_KEYS | {k for k, _ in extra}
    kvs = [raw for key, raw in src.kvs if key not in drop]
    kvs += [u32_kv("general.quantization_version", QNT_VERSION), u32_kv("general.file_type", ftype)]
    kvs += [raw for _, raw in extra]
    parts = [b"GGUF", struct.pack("<IQQ", GGUF_VERSION, len(order), len(kvs))] + kvs
    sizes, offset = [], 0
    for t, ty in zip(order, types):
        name = t.name.encode()
        nd = n_dims(t.ne)
        parts.append(struct.pack("<Q", len(name)) + name + struct.pack("<I", nd)
                     + struct.pack(f"<{nd}Q", *t.ne[:nd]) + struct.pack("<IQ", ty, offset))
        size = t.nbytes(ty)
        sizes.append(size)
        offset += pad(size)
    head = b"".join(parts)
    return head + bytes(pad(len(head)) - len(head)), sizes
