"""Temporary llama.cpp servers for targets that are quantized but not deployed, one at a time.

They start through serving.launch, like deploy's, so they run in the CPU mode the llama.cpp runtime
decided, and are refused before they start when their memory estimate does not fit; a server that fails
to start (or is refused) becomes that target's error, not the whole evaluation's.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from ..config import Config
from ..errors import EvalError, InputError, ResourceError, ServingError
from ..serving import launch
from ..serving.ports import pick_spare

TempServer = launch.TempServer


def free_port(lo: int = 20000, hi: int = 20999) -> int:
    """A port nothing listens on, from the spare range."""
    return pick_spare((lo, hi))


@contextlib.contextmanager
def temp_server(cfg: Config, gguf: Path, alias: str, log_path: Path, lora: Path | None = None) -> Iterator[TempServer]:
    """Serve ``gguf`` (with the LoRA GGUF ``lora`` applied, adapter mode) on a free loopback port for
    the duration of the block."""
    with contextlib.ExitStack() as stack:
        try:
            srv = stack.enter_context(launch.temp_server(cfg, Path(gguf), alias, log_path, lora=lora))
        except (ServingError, InputError, ResourceError) as exc:  # that target is down, with the reason
            raise EvalError(exc.message, hint=exc.hint) from None
        yield srv
