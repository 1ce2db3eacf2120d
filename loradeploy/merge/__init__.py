"""Merge: base model + LoRA adapter -> a complete 16-bit Hugging Face folder.

hf_folder reads the two folders, preflight checks everything that can fail before weights move,
strategies runs the chosen merge (stream: tensor by tensor; peft/unsloth: the libraries).
Importing this package does not import torch.
"""
from __future__ import annotations

from .hf_folder import (TOKENIZER_FILES, AdapterInfo, BaseModelInfo, LoraPair, copy_side_files, folder_digest,
                        load_adapter_info, load_base_info, resolve_base)
from .preflight import MergePlan, check_adapter_against_base, plan_merge, resolve_strategy
from .strategies import merge_folder

__all__ = ["TOKENIZER_FILES", "AdapterInfo", "BaseModelInfo", "LoraPair", "MergePlan", "check_adapter_against_base",
           "copy_side_files", "folder_digest", "load_adapter_info", "load_base_info", "merge_folder", "plan_merge",
           "resolve_base", "resolve_strategy"]
