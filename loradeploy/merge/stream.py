"""Merge a plain LoRA into its base tensor by tensor, never holding more than one tensor.

W' = W + scale · B·A (Embedding: W' = W + scale · (B·A)ᵀ), computed in float32 and rounded once
to the 16-bit output dtype. peft's merge_and_unload is the oracle the tests compare against.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

from ..tools.safetensors_io import read_header, write_streaming
from .hf_folder import AdapterInfo, BaseModelInfo

TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
ST_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def output_dtype(choice: str, base_dtype: str) -> torch.dtype:
    if choice == "float16":
        return torch.float16
    if choice == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if base_dtype == "BF16" else torch.float16


class _TensorFile:
    """Reads one tensor at a time with pread: no mmap, so the process never maps the whole file
    (an mmap'd shard counts fully in RSS once touched, and we touch all of it)."""

    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        self.header = header
        with open(path, "rb") as f:
            self.data_start = 8 + int.from_bytes(f.read(8), "little")
        self.fd = os.open(path, os.O_RDONLY)

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        b, e = info["data_offsets"]
        buf = bytearray(e - b)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = os.preadv(self.fd, [view[got:]], self.data_start + b + got)
            if n <= 0:
                raise OSError(f"{self.path}: short read at tensor {name}")
            got += n
        dtype = TORCH_DTYPES.get(info["dtype"]) or _INT_DTYPES[info["dtype"]]
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "_TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_INT_DTYPES = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def stream_merge(base: BaseModelInfo, adapter: AdapterInfo, out_dir: Path, *, dtype: torch.dtype,
                 progress: Callable[[str, float, float], None] | None = None) -> dict:
    """Write the merged model into ``out_dir`` (an empty folder). Returns counts for the record."""
    out_dir = Path(out_dir)
    by_file: dict[Path, list[str]] = {}
    for name, (f, _) in base.tensors.items():
        by_file.setdefault(f, []).append(name)
    total = len(base.tensors)
    done = merged = replaced = 0
    weight_map: dict[str, str] = {}
    with _TensorFile(adapter.weights, adapter.header) as ad:
        lora_for = {f"{m}.weight": p for m, p in adapter.pairs.items()}
        for fpath, names in sorted(by_file.items()):
            specs = []
            for n in names:
                info = base.tensors[n][1]
                st_dtype = info["dtype"]
                if st_dtype in TORCH_DTYPES:
                    st_dtype = ST_NAMES[dtype]
                specs.append((n, st_dtype, info["shape"]))
                weight_map[n] = fpath.name

            with _TensorFile(fpath, read_header(fpath)) as src:
                def produce(n: str) -> bytes:
                    nonlocal done, merged, replaced
                    t = src.get(n)
                    if n in adapter.full_tensors:
                        t = ad.get(adapter.full_tensors[n])
                        replaced += 1
                    if n in lora_for:
                        pair = lora_for[n]
                        a = ad.get(pair.a_key).to(torch.float32)
                        b = ad.get(pair.b_key).to(torch.float32)
                        delta = b @ a
                        if pair.embedding or adapter.config.get("fan_in_fan_out"):
                            delta = delta.T
                        t = t.to(torch.float32) + delta * adapter.scale(pair.module)
                        merged += 1
                    if t.is_floating_point():
                        t = t.to(dtype)
                    done += 1
                    if progress:
                        progress("merging tensors", done, total)
                    return _to_bytes(t)

                write_streaming(out_dir / fpath.name, specs, produce, metadata={"format": "pt"})
    if len(by_file) > 1 or (base.path / "model.safetensors.index.json").exists():
        total_size = sum((out_dir / f.name).stat().st_size for f in by_file)
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    missing = set(adapter.pairs) - {k[:-len(".weight")] for k in base.tensors}
    return {"tensors": total, "lora_merged": merged, "replaced": replaced, "unmatched": sorted(missing)}
