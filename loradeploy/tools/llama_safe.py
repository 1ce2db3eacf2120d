"""llama.cpp without its extra weight buffer types (AMX, repacked layouts).

Some VMs advertise AMX but trap its instructions: llama.cpp then dies of SIGILL on the first
completion. llama-cpp-python exposes no switch, so its default model params are wrapped before a
model loads. ``python -m loradeploy.tools.llama_safe ARGS`` runs llama-cpp-python's OpenAI
server that way (ARGS as for ``python -m llama_cpp.server``).
"""
from __future__ import annotations

import runpy
import sys


def disable_extra_bufts() -> None:
    """Idempotent: every later llama_cpp model load skips the extra buffer types."""
    import llama_cpp.llama_cpp as C

    if getattr(C.llama_model_default_params, "_loradeploy_safe", False):
        return
    orig = C.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    params._loradeploy_safe = True  # type: ignore[attr-defined]
    C.llama_model_default_params = params


def main() -> None:
    disable_extra_bufts()
    sys.argv = ["llama_cpp.server", *sys.argv[1:]]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
