"""Read safetensors headers without loading tensors; write a file tensor by tensor.

Writing streams: the header is computed from shapes and dtypes first, then each tensor's bytes are
appended, so peak memory is one tensor rather than one shard or one model.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

from ..errors import InputError
from ..fsutil import hashing_open

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 1024 * 1024


def data_start(path: Path) -> int:
    """Where a safetensors file's tensor data begins: after the 8-byte length and the header."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def pread_exact(fd: int, nbytes: int, offset: int) -> bytearray | None:
    """``nbytes`` read from ``fd`` at ``offset`` into a private buffer (never an mmap: a touched mapping
    counts fully in RSS); None when the file ends first (the caller names its own error)."""
    buf = bytearray(nbytes)
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            return None
        got += n
    return buf


def read_header(path: Path) -> dict:
    """The tensor table of a safetensors file: name -> {dtype, shape, data_offsets}."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > MAX_HEADER:
                raise ValueError(f"header length {n} out of range")
            header = json.loads(f.read(n))
            size = path.stat().st_size
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable safetensors file: {exc}",
                         hint="re-export the weights with safe_serialization=True") from None
    hint = "the file is damaged or not safetensors: fetch it again, or export it with safe_serialization=True"
    if not isinstance(header, dict):
        raise InputError(f"{path}: the safetensors header is a JSON {json_kind(header)}, not an object of "
                         "tensors", hint=hint)
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise InputError(f"{path}: the safetensors __metadata__ is not an object", hint=hint)
    for name, info in header.items():
        problem = _entry_problem(info)
        if problem:
            raise InputError(f"{path}: tensor {name!r} {problem}", hint=hint)
        b, e = info["data_offsets"]
        if e > size - 8 - n:
            raise InputError(f"{path}: tensor {name} lies past the end of the file (truncated download?)",
                             hint="fetch the file again")
    if meta is not None:
        header["__metadata__"] = meta
    return header


def json_kind(value) -> str:
    """How a person would call a JSON value's type: list, string, number, ..."""
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null", dict: "object"}.get(type(value), type(value).__name__)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry_problem(info) -> str | None:
    """Why one header entry is not {dtype, shape, data_offsets} as the format defines it, or None."""
    if not isinstance(info, dict):
        return f"is a JSON {json_kind(info)}, not an object with its dtype, shape and data_offsets"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        return f"has no dtype (dtype = {dtype!r})"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"has no valid shape (shape = {shape!r})"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        return f"has no valid data_offsets ({offsets!r})"
    if dtype in DTYPE_BYTES and offsets[1] - offsets[0] != numel(shape) * DTYPE_BYTES[dtype]:
        return (f"holds {offsets[1] - offsets[0]} bytes, but a {dtype} tensor of shape {shape} needs "
                f"{numel(shape) * DTYPE_BYTES[dtype]}")
    return None


def tensor_table(folder: Path) -> dict[str, tuple[Path, dict]]:
    """name -> (file, info) over every *.safetensors file in a folder."""
    out: dict[str, tuple[Path, dict]] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        for name, info in read_header(f).items():
            if name != "__metadata__":
                out[name] = (f, info)
    return out


def numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def write_streaming(path: Path, specs: list[tuple[str, str, list[int]]],
                    produce: Callable[[str], bytes], metadata: dict[str, str] | None = None) -> str:
    """Write ``specs`` (name, dtype, shape) in order, asking ``produce(name)`` for each tensor's bytes.

    Returns the file's sha256, hashed as the bytes are written (the file is never read back)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in specs:
        nbytes = numel(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    with hashing_open(path, background=True) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in specs:
            data = produce(name)
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if len(data) != want:
                raise ValueError(f"tensor {name}: produced {len(data)} bytes, header says {want}")
            f.write(data)
    return f.hexdigest()
