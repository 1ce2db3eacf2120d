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

from ..errors import InputError
from ..tools.safetensors_io import data_start, pread_exact, read_header, write_streaming
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
        self.data_start = data_start(path)
        self.fd = os.open(path, os.O_RDONLY)

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        b, e = info["data_offsets"]
        buf = pread_exact(self.fd, e - b, self.data_start + b)
        if buf is None:
            raise OSError(f"{self.path}: short read at tensor {name}")
        dtype = torch_dtype(info["dtype"])
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


def torch_dtype(st_dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return TORCH_DTYPES.get(st_dtype) or _INT_DTYPES[st_dtype]


def require_finite(weights: _TensorFile) -> None:
    """Refuse an adapter holding NaN or Inf before anything is written, naming the tensor: merged, one
    such value spreads through every layer after it (the adapter is small; reading it twice is cheap)."""
    for key, info in weights.header.items():
        if key == "__metadata__" or info["dtype"] not in TORCH_DTYPES:
            continue
        t = weights.get(key)
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            nan, bad = int(torch.isnan(t).sum()), int((~finite).sum())
            what = "NaN" if nan == bad else "Inf" if nan == 0 else "NaN and Inf"
            raise InputError(f"adapter tensor {key} holds {what} ({bad} of {t.numel()} values): "
                             f"{weights.path.name} is not a usable adapter",
                             hint="the training diverged or the file is damaged; use an earlier checkpoint")


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


class LoraMerger:
    """Merged tensors one at a time, by base tensor name: the one place the merge arithmetic lives,
    shared by the merged-folder writer below and the fused GGUF path (merge/fused.py), so the two
    produce the same bytes by construction.

    ``check`` runs before each tensor (the fused path aborts there when the converter preflight,
    running beside it, has failed).
    """

    def __init__(self, base: BaseModelInfo, adapter: AdapterInfo, *, dtype: torch.dtype,
                 progress: Callable[[str, float, float], None] | None = None,
                 check: Callable[[], None] | None = None):
        self.base, self.adapter, self.dtype = base, adapter, dtype
        self.progress, self.check = progress, check
        self.lora_for = {f"{m}.weight": p for m, p in adapter.pairs.items()}
        self.done = self.merged = self.replaced = 0
        self._files: dict[Path, _TensorFile] = {}
        self._adapter: _TensorFile | None = None

    def __enter__(self) -> "LoraMerger":
        self._adapter = _TensorFile(self.adapter.weights, self.adapter.header)
        try:
            require_finite(self._adapter)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for f in [*self._files.values(), self._adapter]:
            if f is not None:
                f.close()
        self._files.clear()
        self._adapter = None

    def out_dtype(self, name: str) -> str:
        """The safetensors dtype the merged tensor has: floats become the 16-bit output dtype."""
        st_dtype = self.base.tensors[name][1]["dtype"]
        return ST_NAMES[self.dtype] if st_dtype in TORCH_DTYPES else st_dtype

    def _source(self, name: str) -> _TensorFile:
        path = self.base.tensors[name][0]
        if path not in self._files:
            self._files[path] = _TensorFile(path, read_header(path))
        return self._files[path]

    def tensor(self, name: str) -> torch.Tensor:
        if self.check:
            self.check()
        ad = self._adapter
        assert ad is not None, "use LoraMerger as a context manager"
        t = self._source(name).get(name)
        if name in self.adapter.full_tensors:
            t = ad.get(self.adapter.full_tensors[name])
            self.replaced += 1
        if name in self.lora_for:
            pair = self.lora_for[name]
            a = ad.get(pair.a_key).to(torch.float32)
            b = ad.get(pair.b_key).to(torch.float32)
            scale = self.adapter.scale(pair.module)
            if pair.embedding or self.adapter.config.get("fan_in_fan_out"):
                t = t.to(torch.float32) + (b @ a).T * scale
            else:
                t = self._merge_rows(t, a, b, scale)
            self.merged += 1
        if t.is_floating_point():
            t = t.to(self.dtype)
        self.done += 1
        if self.progress:
            self.progress("merging tensors", self.done, len(self.base.tensors))
        return t

    def _merge_rows(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        """W + scale·(B·A) in float32 (peft rounds the delta to 16 bits first; we round once, at the
        end). B·A is one matmul, as before: a banded matmul can pick other BLAS kernels and change
        last bits. The elementwise part (scale, add W, round) goes a band of rows at a time, so its
        float32 operands (~4 MiB) stay in cache instead of three weight-sized passes through memory;
        per element the operations are the same, so the bytes are too. (Smaller bands fit L2 better
        but multiply the thread hand-offs of each op, which cost most on a busy machine.)"""
        out_f, in_f = w.shape
        rows = max(16, (1 << 20) // max(1, in_f))
        delta = b @ a
        out = torch.empty((out_f, in_f), dtype=self.dtype)
        wide = torch.empty((min(rows, out_f), in_f), dtype=torch.float32)
        for i in range(0, out_f, rows):
            d = delta[i:i + rows]
            d.mul_(scale).add_(wide[:len(d)].copy_(w[i:i + rows]))
            out[i:i + rows].copy_(d)
        return out

    def counts(self) -> dict:
        missing = set(self.adapter.pairs) - {k[:-len(".weight")] for k in self.base.tensors}
        return {"tensors": len(self.base.tensors), "lora_merged": self.merged, "replaced": self.replaced,
                "unmatched": sorted(missing)}


def files_of(base: BaseModelInfo) -> dict[Path, list[str]]:
    """Base tensor names by the file holding them, files sorted (the merged folder mirrors this)."""
    by_file: dict[Path, list[str]] = {}
    for name, (f, _) in base.tensors.items():
        by_file.setdefault(f, []).append(name)
    return dict(sorted(by_file.items()))


def writes_index(base: BaseModelInfo) -> bool:
    """Whether the merged folder gets a model.safetensors.index.json (the converter then reads it)."""
    return len(files_of(base)) > 1 or (base.path / "model.safetensors.index.json").exists()


def stream_merge(base: BaseModelInfo, adapter: AdapterInfo, out_dir: Path, *, dtype: torch.dtype,
                 progress: Callable[[str, float, float], None] | None = None,
                 check: Callable[[], None] | None = None) -> dict:
    """Write the merged model into ``out_dir`` (an empty folder). Returns counts for the record and,
    under "sha256", each weight file's digest, hashed while written."""
    out_dir = Path(out_dir)
    by_file = files_of(base)
    weight_map: dict[str, str] = {}
    digests: dict[str, str] = {}
    with LoraMerger(base, adapter, dtype=dtype, progress=progress, check=check) as m:
        for fpath, names in by_file.items():
            specs = [(n, m.out_dtype(n), base.tensors[n][1]["shape"]) for n in names]
            weight_map.update((n, fpath.name) for n in names)
            digests[fpath.name] = write_streaming(out_dir / fpath.name, specs, lambda n: _to_bytes(m.tensor(n)),
                                                  metadata={"format": "pt"})
        info = m.counts()
    if writes_index(base):
        total_size = sum((out_dir / f.name).stat().st_size for f in by_file)
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    return {**info, "sha256": digests}
