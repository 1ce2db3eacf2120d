"""Run the planned strategy into a temporary folder that becomes the merged folder only when complete."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..fsutil import atomic_output
from .hf_folder import copy_side_files, folder_digest
from .preflight import MergePlan, abort_on

if TYPE_CHECKING:
    from concurrent.futures import Future

    from ..config import MergeConfig


def merge_folder(plan: MergePlan, out: Path, merge: "MergeConfig", progress: Callable[[str, float, float], None],
                 preflight: "Future | None" = None) -> tuple[str, dict]:
    """Write the merged HF folder to ``out``; returns (digest of the folder, facts for the record).

    ``preflight`` is the converter preflight running beside the merge: the stream merge stops at its
    next tensor once it failed, and the folder is renamed into place only after it succeeded (its
    findings join the record), so a model the converter cannot take leaves no merged folder.

    The stream strategy hashes its weight files while writing them; the library strategies write
    through transformers, so their folder is read back to be hashed."""
    # torch is imported only here: preflight and folder reading stay light for the other stages
    from .peft import peft_merge, unsloth_merge
    from .stream import _TensorFile, output_dtype, require_finite, stream_merge

    base, adapter = plan.base, plan.adapter
    dtype = output_dtype(merge.dtype, base.dtype)
    known: dict[str, str] = {}
    if plan.strategy != "stream":   # the stream merge checks its adapter as it opens it
        with _TensorFile(adapter.weights, adapter.header) as weights:
            require_finite(weights)
    with atomic_output(out, is_dir=True) as tmp:
        if plan.strategy == "stream":
            info = stream_merge(base, adapter, tmp, dtype=dtype, progress=progress, check=abort_on(preflight))
            known = info.pop("sha256")
            copy_side_files(base.path, adapter.path, tmp, dtype)
            info["dtype"] = str(dtype).removeprefix("torch.")
        elif plan.strategy == "peft":
            info = peft_merge(base, adapter, tmp, dtype=dtype, device=merge.device,
                              trust_remote_code=merge.trust_remote_code, max_shard_size=merge.max_shard_size,
                              progress=progress)
        else:
            info = unsloth_merge(base, adapter, tmp, dtype=dtype)
        if preflight is not None:
            info.update(preflight.result())
    return folder_digest(out, known), info
