"""The quantize engine: llama.cpp's per-tensor type rules, bit-exact kernels and a tensor cache,
producing every requested format in one pass over an F16 GGUF (see engine.py)."""
from .cache import TensorCache, cache_dir
from .engine import ENGINE_VERSION, EngineResult, FormatResult, quantize_formats, why_unsupported
from .rules import FORMATS, Options, Unsupported

__all__ = ["ENGINE_VERSION", "EngineResult", "FORMATS", "FormatResult", "Options", "TensorCache", "Unsupported",
           "cache_dir", "quantize_formats", "why_unsupported"]
