"""Adapter mode: a PEFT LoRA adapter converted to a llama.cpp LoRA GGUF and applied at run time on a
shared base GGUF (``--lora`` / ``lora_path``), instead of being merged into the weights.

preflight: which adapters llama.cpp can apply exactly as PEFT does, and the alpha the GGUF must carry;
convert: llama.cpp's convert_lora_to_gguf.py with that alpha, its output read back and checked.
"""
from __future__ import annotations

from .convert import convert_adapter, lora_gguf_info
from .preflight import LoraPlan, check_adapter

__all__ = ["LoraPlan", "check_adapter", "convert_adapter", "lora_gguf_info"]
