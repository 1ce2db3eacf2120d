"""Weights for the streamed reference, read a piece at a time: rows of a tensor, one decoder layer's
parameters, and the adapter's LoRA applied as peft applies it.

Reads go through ``pread`` into private buffers (never an mmap: a touched mapping counts fully in RSS),
and 16-bit weights become float32 one tensor at a time, so at most one layer is float32 at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import VerifyError
from ..merge.hf_folder import AdapterInfo
from ..merge.stream import torch_dtype
from ..tools.safetensors_io import DTYPE_BYTES, data_start, numel, pread_exact, read_header

class Weights:
    """name -> tensor rows, over the safetensors files of a folder (or one file)."""

    def __init__(self, table: dict[str, tuple[Path, dict]]):
        self.table = table
        self._fds: dict[Path, tuple[int, int]] = {}

    @classmethod
    def of_file(cls, path: Path) -> "Weights":
        return cls({k: (Path(path), v) for k, v in read_header(path).items() if k != "__metadata__"})

    def __contains__(self, name: str) -> bool:
        return name in self.table

    def shape(self, name: str) -> list[int]:
        return list(self.table[name][1]["shape"])

    def _fd(self, path: Path) -> tuple[int, int]:
        if path not in self._fds:
            self._fds[path] = (os.open(path, os.O_RDONLY), data_start(path))
        return self._fds[path]

    def rows(self, name: str, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """Rows ``lo:hi`` of a tensor (all of it by default) as float32."""
        if name not in self.table:
            raise VerifyError(f"the weights have no tensor {name}", hint="the base folder is incomplete")
        path, info = self.table[name]
        shape = list(info["shape"])
        row_bytes = numel(shape[1:]) * DTYPE_BYTES[info["dtype"]]
        hi = (shape[0] if shape else 1) if hi is None else hi
        fd, start = self._fd(path)
        buf = pread_exact(fd, (hi - lo) * row_bytes, start + info["data_offsets"][0] + lo * row_bytes)
        if buf is None:
            raise VerifyError(f"{path}: short read at tensor {name}", hint="the file is truncated; fetch it again")
        out_shape = [hi - lo, *shape[1:]] if shape else []
        if not buf:
            return torch.empty(out_shape, dtype=torch.float32)
        return torch.frombuffer(buf, dtype=torch_dtype(info["dtype"])).reshape(out_shape).to(torch.float32)

    def gather(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of a 2-D tensor (embedding lookups), each distinct row read once."""
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.stack([self.rows(name, int(i), int(i) + 1)[0] for i in uniq.tolist()])
        return rows[inverse]

    def close(self) -> None:
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass
class Lora:
    """One module's LoRA: float32 A (r x in) and B (out x r) and peft's scaling."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    def delta(self, x: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
        """peft's Linear: lora_B(lora_A(dropout(x))) * scaling (dropout is identity in eval); ``rows``
        restricts B to some outputs (a vocabulary chunk of the head)."""
        b = self.b if rows is None else self.b[rows]
        return F.linear(F.linear(x, self.a), b) * self.scale

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """peft's Embedding: embedding(x, lora_embedding_A.T) @ lora_embedding_B.T * scaling."""
        return (F.embedding(ids, self.a.T) @ self.b.T) * self.scale


@dataclass
class AdapterWeights:
    """The adapter's tensors by base module name, read when a layer needs them."""

    info: AdapterInfo
    file: Weights = field(init=False)

    def __post_init__(self) -> None:
        self.file = Weights.of_file(self.info.weights)

    def lora(self, module: str) -> Optional[Lora]:
        pair = self.info.pairs.get(module)
        if pair is None:
            return None
        return Lora(self.file.rows(pair.a_key), self.file.rows(pair.b_key), self.info.scale(module))

    def replaced(self, tensor: str) -> Optional[str]:
        """The adapter's key of a full tensor it replaces (peft's modules_to_save), or None."""
        return self.info.full_tensors.get(tensor)

    def modules_under(self, prefix: str) -> list[str]:
        return sorted(m for m in self.info.pairs if m.startswith(prefix))

    def close(self) -> None:
        self.file.close()


class LayerLora:
    """LoRA on the nn.Linear modules of one materialised layer, through forward hooks; ``on`` switches
    it for both streams that share the layer (peft's disable_adapter)."""

    def __init__(self, layer: torch.nn.Module, prefix: str, adapter: AdapterWeights):
        self.on = True
        self.hooks = []
        for module in adapter.modules_under(prefix):
            sub = layer.get_submodule(module[len(prefix):])
            if not isinstance(sub, torch.nn.Linear):
                raise VerifyError(f"the adapter's LoRA on {module} targets a {type(sub).__name__}; the streamed "
                                  "reference applies LoRA to Linear layers only", hint="set verify.reference: memory")
            lora = adapter.lora(module)
            self.hooks.append(sub.register_forward_hook(self._hook(lora)))

    def _hook(self, lora: Lora):
        def add(_module, args, out):
            return out + lora.delta(args[0].to(lora.a.dtype)) if self.on else out
        return add

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def load_layer(layer: torch.nn.Module, prefix: str, weights: Weights,
               replace: Optional[dict[str, torch.Tensor]] = None) -> torch.nn.Module:
    """Materialise a meta-device layer from ``weights`` (float32, assigned, no copy) in place."""
    state = {}
    for key in layer.state_dict():
        state[key] = replace[key] if replace and key in replace else weights.rows(prefix + key)
    layer.load_state_dict(state, strict=True, assign=True)
    return layer


def free_layer(layer: torch.nn.Module) -> None:
    """Back to the meta device: the float32 parameters are released."""
    layer.to("meta")
    release_freed()


_TRIM: list = []


def release_freed() -> None:
    """Give memory the allocator has freed back to the system. glibc keeps freed heap pages of the
    16-bit read buffers (allocated below its adaptive mmap threshold) and a layer's worth of them
    accumulates per layer: measured at 0.5B, RSS grew 50 MB per layer without this and stays flat with
    it. Elsewhere (no glibc) a no-op."""
    if not _TRIM:
        try:
            import ctypes

            _TRIM.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _TRIM.append(None)
    if _TRIM[0] is not None:
        _TRIM[0](0)
