"""The python backend: llama-cpp-python's OpenAI-compatible app on a loopback port, in the CPU mode
the runtime decided. Logs to server.log. What the port serves (/loradeploy/info) and the per-model
system prompt are the front proxy's, the same for every kind of backend (serving.proxy)."""
from __future__ import annotations

import os
import sys
import time

from ..llamacpp.runtime import apply_mode
from .backends import read_key


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {msg}", file=sys.stderr, flush=True)


_LOG_CALLBACK = None  # kept referenced: llama.cpp holds only a C pointer to it


def _quiet_llama(verbose: bool) -> None:
    """Route llama.cpp's log to server.log: warnings and errors always (why a file will not load),
    its hundreds of info lines per load only when verbose. llama-cpp-python's own filter maps the
    ggml levels of the llama.cpp it bundles wrongly (ERROR=4 reads as DEBUG and is dropped), so
    this process installs its own callback with ggml.h's levels."""
    global _LOG_CALLBACK
    import ctypes

    import llama_cpp

    warn, error, cont = 3, 4, 5  # ggml_log_level in ggml.h
    shown = {"last": False}

    @llama_cpp.llama_log_callback
    def callback(level, text, _user):
        show = shown["last"] if level == cont else (verbose or level in (warn, error))
        shown["last"] = show
        if show:
            sys.stderr.write(text.decode("utf-8", errors="replace"))
            sys.stderr.flush()

    _LOG_CALLBACK = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def run_backend(conf: dict) -> int:
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    apply_mode(conf.get("extra_bufts", True) is not False)
    _log(f"llama.cpp CPU mode: {conf.get('cpu_mode') or ('default' if conf.get('extra_bufts', True) else 'safe')}")
    t0 = time.monotonic()
    # interrupt_requests=False: overlapping requests queue instead of cutting a stream short
    # api_key: the backend's own key (serving.backends.key_path), which only the front proxy holds
    key = read_key(conf.get("api_key_file"))
    if conf.get("api_key_file") and key is None:
        _log(f"cannot read the backend key {conf['api_key_file']}: refusing to serve without it")
        return 2
    server = ServerSettings(host=conf["host"], port=conf["port"], api_key=key, interrupt_requests=False)
    model = ModelSettings(model=conf["gguf"], model_alias=conf["alias"], n_ctx=conf["n_ctx"],
                          n_threads=conf["threads"], n_threads_batch=conf["threads"],
                          n_gpu_layers=conf["n_gpu_layers"], n_batch=conf["n_batch"], chat_format=None,
                          verbose=True, **({"lora_path": conf["lora_path"]} if conf.get("lora_path") else {}),
                          **conf.get("model_extra", {}))
    # verbose=True only stops llama-cpp-python from muting stdout/stderr while loading; what
    # llama.cpp logs is filtered by _quiet_llama.
    _quiet_llama(bool(conf.get("verbose", False)))
    app = create_app(server_settings=server, model_settings=[model])
    from llama_cpp.server import app as app_module

    loaded = getattr(app_module, "_llama_proxy", None)
    if loaded is not None and getattr(loaded, "_current_model", None) is not None:
        loaded._current_model.verbose = bool(conf.get("verbose", False))  # no per-request timings
    _log(f"backend {conf['alias']} {conf['version']} loaded {conf['gguf']} in {time.monotonic() - t0:.1f}s; "
         f"listening on {conf['host']}:{conf['port']}")
    # Graceful shutdown on SIGTERM: uvicorn finishes requests in flight before exiting.
    uvicorn.run(app, host=conf["host"], port=conf["port"], log_level="warning", timeout_graceful_shutdown=60)
    return 0


