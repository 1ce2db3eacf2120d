"""The two kinds of backend a served port can have, as the worker config launch writes for each:

* ``llama-server``: llama.cpp's own server (built at setup, loradeploy.llamacpp.tools), with
  ``parallel`` slots and continuous batching, so overlapping requests are decoded together;
* ``python``: llama-cpp-python's server (serving.backend), one request at a time.

Both run under the worker's supervisor (serving.worker), which records how the server ended.

Every backend is locked with its own random key (``new_key``), written 0600 next to its worker config
(``key_path``) and held otherwise only by the front proxy of the ports it serves (``Control.backend_key``):
llama-server reads it with ``--api-key-file`` (never on the command line, which ``ps`` shows), the python
backend gives it to llama-cpp-python's ``ServerSettings(api_key=)``. From loopback without the key, a
backend answers 401 on every route but what llama-server exempts by design: ``/health`` and ``/v1/health``
(and the web UI's asset paths, which ``--no-webui`` leaves empty). llama-cpp-python's server exempts none.
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..errors import InputError, LlamaRuntimeError, ServingError
from ..llamacpp import runtime

if TYPE_CHECKING:
    from ..config import Config

KINDS = ("llama-server", "python")
LABELS = {"llama-server": "llama-server", "python": "llama-cpp-python server"}  # for messages


def new_key() -> str:
    return secrets.token_urlsafe(32)


def key_path(conf_path: Path | str) -> Path:
    """The backend's secret key file, next to its worker config (``backend-PORT.key``)."""
    return Path(conf_path).with_suffix(".key")


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by this user only (0600 before the rename)."""
    from ..fsutil import atomic_output

    with atomic_output(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)


def read_key(key_file: Path | str | None) -> Optional[str]:
    """A backend's key from its key file; None when it has none (a backend started before keys)."""
    if not key_file:
        return None
    try:
        return Path(key_file).read_text().strip() or None
    except OSError:
        return None


def threads(cfg: "Config") -> int:
    from ..resources import cpu_budget

    return cfg.deployment.llamacpp.threads or cpu_budget(cfg.performance.max_cpu_threads)


def extra_model_settings(args: Sequence[str]) -> dict:
    """deployment.llamacpp.extra_args as llama-cpp-python ModelSettings fields (--name value)."""
    from llama_cpp.server.settings import ModelSettings

    out: dict[str, Any] = {}
    items = list(args)
    i = 0
    while i < len(items):
        key = items[i]
        if not key.startswith("--"):
            raise InputError(f"deployment.llamacpp.extra_args: expected --name value, got {key!r}")
        key, eq, val = key[2:].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise InputError(f"deployment.llamacpp.extra_args: --{key} has no value")
            val, i = items[i + 1], i + 1
        key = key.replace("-", "_")
        if key not in ModelSettings.model_fields:
            raise InputError(f"deployment.llamacpp.extra_args: unknown llama.cpp server setting --{key}",
                             hint="use a llama_cpp.server ModelSettings field, e.g. --flash_attn true")
        out[key] = val
        i += 1
    return out


LOAD_MODE_FLAGS = {"-lm", "--load-mode", "--mmap", "--no-mmap"}  # a user's own choice in extra_args wins


def reads_weights(s, mode: runtime.Mode) -> bool:
    """Whether llama-server should read the weights into memory (``--load-mode none``, the pinned
    llama.cpp's --no-mmap) instead of mapping them: when it repacks them for the CPU (default mode,
    no GPU layers). llama.cpp copies repacked tensors into anonymous memory and never unmaps their
    file pages (llama.cpp issues 16761, 19578; llama_model_loader unmaps only outside the mapped
    tensors' range), so a mapped model holds those weights twice; read, each is in RAM once."""
    own = {a.split("=", 1)[0] for a in s.extra_args} & LOAD_MODE_FLAGS
    return mode.extra_bufts and s.n_gpu_layers == 0 and not own


def mmap_args(s, mode: runtime.Mode) -> list[str]:
    return ["--load-mode", "none"] if reads_weights(s, mode) else []


def server_memory(cfg: "Config", alias: str, gguf: Path, mode: runtime.Mode, loras: Sequence[Path] = ()):
    """What the backend of ``gguf`` will hold (memory_estimate.llama_load): the weights once (read when
    repacked, else mapped), the KV cache of every slot, compute buffers, the supervisor (and, for the
    python backend, its interpreter), the LoRA adapters it loads."""
    import dataclasses

    from ..memory_estimate import MIB, SUPERVISOR_RSS, gguf_facts, llama_load
    s = cfg.deployment.llamacpp
    server = s.backend == "llama-server"
    est = llama_load(gguf_facts(gguf), what=f"{LABELS[s.backend]} for {alias}", n_ctx=s.n_ctx * (s.parallel if server
                     else 1), n_ubatch=min(512, s.n_batch), n_seq=s.parallel if server else 1,
                     mmap=not (server and reads_weights(s, mode)), repack=mode.extra_bufts,
                     supervisor=SUPERVISOR_RSS if server else 160 * MIB, gpu_layers=s.n_gpu_layers)
    lora = sum(Path(p).stat().st_size for p in loras)
    return dataclasses.replace(est, anon=est.anon + lora, terms={**est.terms, "LoRA adapters": lora}) if lora else est


def llama_server_argv(cfg: "Config", alias: str, gguf: Path, port: int, mode: runtime.Mode,
                      loras: Sequence[Path] = (), per_request: bool = True, key_file: Optional[Path] = None) -> list[str]:
    """llama-server's command line for one model on a loopback port in the decided CPU mode.

    ``loras`` (adapter mode) are loaded at start, ids 0.. in this order; ``per_request``: each at
    scale 0 (GET /lora-adapters says 0.0) until a request names it in its ``lora`` field (the proxy of
    each model's port sets that), else all applied at scale 1 (evaluation's one-adapter servers)."""
    from ..llamacpp.tools import tool

    s = cfg.deployment.llamacpp
    try:
        exe = tool("llama-server")
    except LlamaRuntimeError as exc:
        raise ServingError(exc.message, hint=exc.hint) from None
    n = str(threads(cfg))
    # -c is the whole KV cache, shared out over the slots: each slot gets the configured n_ctx.
    argv = [str(exe), "-m", str(gguf), "--alias", alias, "--host", "127.0.0.1", "--port", str(port),
            "-c", str(s.n_ctx * s.parallel), "-np", str(s.parallel), "--cont-batching", "-t", n, "-tb", n,
            "-b", str(s.n_batch), "--metrics", "--no-webui"]
    if key_file is not None:
        argv += ["--api-key-file", str(key_file)]
    # Always written out: a Metal build (macOS) offloads every layer when -ngl is not given, so
    # n_gpu_layers: 0 must say 0 to mean the CPU there.
    argv += ["-ngl", "all" if s.n_gpu_layers < 0 else str(s.n_gpu_layers)]
    if not mode.extra_bufts:
        # The flag that clears common_params.no_extra_bufts' default: no repacked/AMX weight buffers.
        argv.append("--no-repack")
    argv += mmap_args(s, mode)
    for lora in loras:
        if per_request and any(c in str(lora) for c in ":,"):  # --lora-scaled's separators
            raise InputError(f"LoRA GGUF path {lora} has ':' or ',', which llama-server cannot take",
                             hint="move the models folder (deployment.models_dir) to a path without them")
        # Per request: every adapter at scale 0 (--lora-init-without-apply alone leaves the server's own
        # scales at 1.0, so a request without a lora field would run every persona stacked).
        argv += ["--lora-scaled", f"{lora}:0"] if per_request else ["--lora", str(lora)]
    if loras and per_request:
        argv.append("--lora-init-without-apply")
    return argv + list(s.extra_args)


def backend_conf(cfg: "Config", alias: str, gguf: Path, port: int, mode: runtime.Mode, *,
                 extra: Optional[dict], version: str, fmt: str, sha256: str, loras: Sequence[Path] = (),
                 per_request: bool = True, key_file: Optional[Path] = None) -> dict:
    """The worker config: what is served (for logs and status) and, for llama-server, its argv."""
    s = cfg.deployment.llamacpp
    conf = {"kind": s.backend, "alias": alias, "version": version, "format": fmt, "sha256": sha256,
            "gguf": str(gguf), "host": "127.0.0.1", "port": port, "cpu_mode": mode.describe(),
            "extra_bufts": mode.extra_bufts, "loras": [str(p) for p in loras],
            "api_key_file": str(key_file) if key_file is not None else None}
    if s.backend == "llama-server":
        conf["argv"] = llama_server_argv(cfg, alias, gguf, port, mode, loras, per_request, key_file)
    elif len(loras) > 1 or loras and per_request:
        raise InputError("adapter mode needs llama-server: llama-cpp-python's server cannot switch adapters "
                         "per request", hint="set deployment.llamacpp.backend: llama-server")
    elif loras:
        conf["lora_path"] = str(loras[0])
    else:
        conf.update(n_ctx=s.n_ctx, threads=threads(cfg), n_gpu_layers=s.n_gpu_layers, n_batch=s.n_batch,
                    model_extra=extra or {})
    return conf


def child_argv(conf: dict, conf_path: Path) -> list[str]:
    """What the supervisor runs: llama-server's own argv, or the python backend in a child process."""
    if conf.get("argv"):
        return list(conf["argv"])
    return [sys.executable, "-m", "loradeploy.serving.worker", "backend-child", str(conf_path)]

