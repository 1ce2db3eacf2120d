"""Fused merge → GGUF: merged tensors flow straight into llama.cpp's converter (used as a library),
so no merged HF folder is written, read back or hashed.

The output is byte-identical to the two-step path (stream merge to a folder, then the converter on
that folder) because each piece is the same: LoraMerger does the arithmetic for both, the converter
sees the same config, tokenizer and folder name (a side-file folder named like the merged folder),
and the tensors arrive in the order the converter would have read them from the merged folder.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..fsutil import TMP_MARK
from ..tools import converter
from .hf_folder import copy_side_files
from .preflight import MergePlan

if TYPE_CHECKING:
    from ..config import MergeConfig


def converter_order(base, merger) -> list:
    """TensorSources in the order the converter indexes the merged folder stream_merge would write:
    parts from the index's weight map (every file) when there is one, else the files named model*;
    parts sorted by name, tensors sorted by name within each part."""
    from .stream import files_of, torch_dtype, writes_index
    files = files_of(base)
    if not writes_index(base):
        files = {f: n for f, n in files.items() if f.name.startswith("model") and f.name.endswith(".safetensors")}
    out = []
    for _, names in sorted(files.items(), key=lambda kv: kv[0].name):
        for n in sorted(names):
            out.append(converter.TensorSource(n, torch_dtype(merger.out_dtype(n)), tuple(base.tensors[n][1]["shape"]),
                                              lambda n=n: merger.tensor(n)))
    return out


def fused_convert(plan: MergePlan, out: Path, merge: "MergeConfig", *, outtype: str, model_name: str,
                  folder_name: str, log: logging.Logger | None = None,
                  progress: Callable[[str, float, float], None] | None = None) -> dict:
    """Write the GGUF of base + adapter to ``out`` (the caller wraps it in atomic_output).

    ``folder_name`` is the name the merged folder would have had: the converter derives metadata from
    it. Returns facts for the record, with the output's sha256 (hashed while written).

    No separate converter preflight: in-process, the converter checks the architecture and writes the
    vocabulary before the first tensor is merged, which is the preflight's check without its cost."""
    from .stream import LoraMerger, output_dtype
    base, adapter = plan.base, plan.adapter
    dtype = output_dtype(merge.dtype, base.dtype)
    out = Path(out)
    # beside the output, marked as a temporary so `loradeploy clean` finds one a killed run left
    # (named with this pid, as every partial file is: the next run removes it once this process is dead)
    with tempfile.TemporaryDirectory(prefix=".fused-", suffix=f".{os.getpid()}{TMP_MARK}", dir=out.parent) as td:
        side = Path(td) / folder_name
        side.mkdir()
        copy_side_files(base.path, adapter.path, side, dtype)
        with LoraMerger(base, adapter, dtype=dtype, progress=progress) as m:
            written = converter.write_gguf(side, out, outtype=outtype, model_name=model_name,
                                           sources=converter_order(base, m), log=log)
            info = m.counts()
    return {**info, "dtype": str(dtype).removeprefix("torch."), **written}
