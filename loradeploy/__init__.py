"""loradeploy: LoRA adapter -> merged -> GGUF -> quantized -> served, checked and compared."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, load_config  # noqa: E402
from .errors import LoradeployError  # noqa: E402


def run_pipeline(*args, **kwargs):
    from .pipeline import run_pipeline as _run
    return _run(*args, **kwargs)


__all__ = ["Config", "LoradeployError", "load_config", "run_pipeline", "__version__"]
