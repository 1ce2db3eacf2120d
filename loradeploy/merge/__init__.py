"""Merge: base model + LoRA adapter -> a 16-bit Hugging Face folder, or straight into a GGUF.

hf_folder reads the two folders, preflight checks everything that can fail before weights move,
strategies runs the chosen merge into a folder (stream: tensor by tensor; peft/unsloth: the
libraries); fused merges straight into the converter, writing the GGUF without a merged folder.
Importing this package does not import torch.
"""
from __future__ import annotations

from .fused import fused_convert
from .hf_folder import (TOKENIZER_FILES, AdapterInfo, BaseModelInfo, LoraPair, copy_side_files, folder_digest,
                        load_adapter_info, load_base_info, resolve_base)
from .preflight import (FUSED, TWO_STEP, MergePlan, check_adapter_against_base, merge_path, plan_merge,
                        resolve_strategy)
from .strategies import merge_folder

__all__ = ["FUSED", "TOKENIZER_FILES", "TWO_STEP", "AdapterInfo", "BaseModelInfo", "LoraPair", "MergePlan",
           "check_adapter_against_base", "copy_side_files", "folder_digest", "fused_convert", "load_adapter_info",
           "load_base_info", "merge_folder", "merge_path", "plan_merge", "resolve_base", "resolve_strategy"]
