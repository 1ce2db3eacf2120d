"""The library merges: transformers + peft (any adapter peft can load: DoRA, extra weights, ...)
and unsloth. Both hold the whole model in memory; the stream merge is the low-memory path."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from ..errors import MergeError, StageUnavailable
from .hf_folder import AdapterInfo, BaseModelInfo, copy_side_files


def mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(want: str, *, auto_mps: bool = False) -> str:
    """cuda, mps (Apple Silicon's GPU) or cpu. ``auto`` takes a CUDA GPU, then, with ``auto_mps``,
    Apple's (the merge, in its 16-bit dtype); the verify reference leaves auto_mps off and stays on
    the CPU in float32 unless mps is asked for by name."""
    import torch

    if want == "cuda" and not torch.cuda.is_available():
        raise MergeError("merge.device is cuda but no CUDA GPU is visible", hint="set merge.device: auto or cpu")
    if want == "mps" and not mps_available():
        raise MergeError("device mps is asked for but no Apple GPU (MPS) is visible",
                         hint="set the device to auto or cpu; MPS needs macOS 12.3+ on Apple Silicon")
    if want == "mps" or (want == "auto" and auto_mps and not torch.cuda.is_available() and mps_available()):
        return "mps"
    return "cuda" if want in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def peft_merge(base: BaseModelInfo, adapter: AdapterInfo, out: Path, *, dtype, device: str,
               trust_remote_code: bool, max_shard_size: str,
               progress: Callable[[str, float, float], None]) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = pick_device(device, auto_mps=True)
    progress("loading base model", 0, 3)
    model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=dtype, low_cpu_mem_usage=True,
                                                 device_map=device, trust_remote_code=trust_remote_code)
    progress("applying adapter", 1, 3)
    model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
    model = model.merge_and_unload()
    progress("saving merged weights", 2, 3)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    elif device == "mps":
        torch.mps.empty_cache()
    saved_cfg = (out / "config.json").read_text()
    copy_side_files(base.path, adapter.path, out, dtype)
    # keep the config transformers wrote (it matches the saved weights); side files add the tokenizer
    (out / "config.json").write_text(saved_cfg)
    progress("saved", 3, 3)
    return {"dtype": str(dtype).removeprefix("torch."), "device": device}


def unsloth_merge(base: BaseModelInfo, adapter: AdapterInfo, out: Path, *, dtype) -> dict:
    if importlib.util.find_spec("unsloth") is None:
        raise StageUnavailable("merge.strategy unsloth needs the unsloth package, which is not installed",
                               hint="pip install unsloth (CUDA only), or set merge.strategy: auto")
    from unsloth import FastLanguageModel  # pragma: no cover - needs a CUDA box

    model, tokenizer = FastLanguageModel.from_pretrained(str(adapter.path), dtype=dtype, load_in_4bit=False)
    model.save_pretrained_merged(str(out), tokenizer, save_method="merged_16bit")
    copy_side_files(base.path, adapter.path, out, dtype)
    return {"dtype": str(dtype).removeprefix("torch.")}
