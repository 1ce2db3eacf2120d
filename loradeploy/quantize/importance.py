"""An importance matrix as llama-quantize reads it, for the engine to quantize with.

What tools/quantize/quantize.cpp and common/imatrix-loader.cpp of the pinned llama.cpp do, and so
what this does: the GGUF imatrix's ``<tensor>.in_sum2`` / ``<tensor>.counts`` pairs become one float32
weight per column, ``sum / float(lround(count))`` per expert (1 where the count is 0); the output gets
``quantize.imatrix.file`` (the path as given on the command line, at most 127 bytes),
``quantize.imatrix.dataset`` (the first dataset), ``quantize.imatrix.entries_count`` and
``quantize.imatrix.chunks_count`` (when above 0), set after ``general.file_type`` in that order. The old
binary imatrix format and --include/--exclude-weights are left to llama-quantize (``Unsupported``).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .gguf_out import Tensor, str_kv, u32_kv
from .rules import Unsupported

_SUM, _COUNT = ".in_sum2", ".counts"
_VAL_MAX = 127          # llama_model_kv_override.val_str is char[128]


@dataclass
class Importance:
    path: Path
    values: dict[str, np.ndarray]          # tensor name -> float32 weights, one per column (per expert)
    datasets: list[str]
    chunk_count: int
    given_as: str = ""                     # the path as the llama-quantize command line names it
    _digests: dict[str, str] = field(default_factory=dict)

    def kvs(self) -> tuple[tuple[str, bytes], ...]:
        """The key/values llama-quantize adds for this imatrix, encoded, in its order."""
        out = [("quantize.imatrix.file", os.fsencode(self.given_as or str(self.path))[:_VAL_MAX])]
        if self.datasets:
            out.append(("quantize.imatrix.dataset", self.datasets[0].encode()[:_VAL_MAX]))
        enc = [(k, str_kv(k, v)) for k, v in out]
        enc.append(("quantize.imatrix.entries_count", u32_kv("quantize.imatrix.entries_count", len(self.values))))
        if self.chunk_count > 0:
            enc.append(("quantize.imatrix.chunks_count", u32_kv("quantize.imatrix.chunks_count", self.chunk_count)))
        return tuple(enc)

    def for_tensor(self, t: Tensor) -> Optional[np.ndarray]:
        """The weights for ``t``, None when the file has none; a size that does not fit is llama.cpp's
        error too (token_embd excepted: it is then quantized without)."""
        v = self.values.get(t.name)
        if v is None:
            return None
        experts = t.ne[2] if len(t.ne) > 2 else 1
        if v.size != t.n_per_row * experts:
            if t.name in ("token_embd.weight", "per_layer_token_embd.weight"):
                return None
            raise Unsupported(f"imatrix size {v.size} is different from tensor size {t.n_per_row * experts} "
                              f"for {t.name}")
        return v

    def digest(self, name: str) -> str:
        """Of one tensor's weights: part of the tensor cache's key for types that use them."""
        if name not in self._digests:
            self._digests[name] = hashlib.sha256(self.values[name].tobytes()).hexdigest()
        return self._digests[name]


def _lround(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x.astype(np.float64)) + 0.5)


def load(path: Path, given_as: Optional[str] = None) -> Importance:
    """Read a GGUF imatrix (llama-imatrix --output-format gguf)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        r = GGUFReader(str(path))
    except (ValueError, OSError) as exc:   # the legacy binary format, or no GGUF at all
        raise Unsupported(f"{path.name} is not a GGUF imatrix ({exc}); llama-quantize reads the old format") from None
    fields = r.fields
    if not all(k in fields for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")):
        raise Unsupported(f"{path.name} lacks imatrix metadata (llama-quantize refuses it)")
    ds = fields["imatrix.datasets"]
    datasets = [bytes(ds.parts[i]).decode("utf-8", "replace") for i in ds.data]
    chunk_count = int(fields["imatrix.chunk_count"].parts[-1][0])
    sums, counts = {}, {}
    for t in r.tensors:
        if t.name.endswith(_SUM):
            sums[t.name[:-len(_SUM)]] = t
        elif t.name.endswith(_COUNT):
            counts[t.name[:-len(_COUNT)]] = t
    if sums.keys() != counts.keys():
        raise Unsupported(f"{path.name}: mismatched sums and counts")
    values = {}
    for name, s in sums.items():
        total = np.asarray(s.data, np.float32).reshape(-1)
        n = _lround(np.asarray(counts[name].data, np.float32).reshape(-1)).astype(np.float32)
        per = total.reshape(n.size, -1)
        out = np.ones_like(per)
        nz = n > 0
        out[nz] = per[nz] / n[nz, None]
        out = out.reshape(-1)
        if not np.isfinite(out).all():
            raise Unsupported(f"{path.name}: imatrix contains a non-finite value")
        values[name] = np.ascontiguousarray(out, np.float32)
    if not values:
        raise Unsupported(f"{path.name}: no imatrix entries")
    return Importance(path, values, datasets, chunk_count, given_as or str(path))
