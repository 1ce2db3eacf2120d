"""The one way a llama.cpp server starts: a backend (llama-server or the python one, see
serving.backends) under the worker's supervisor on a loopback port, in the CPU mode the runtime
decided, ready only once it lists the model and answers a real completion.

Deploy's per-version backends and evaluation's temporary servers both come through here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from ..errors import HttpError, InputError, ServingError
from ..llamacpp import runtime
from ..tools import proc
from ..tools.openai_http import Client
from ..memory_estimate import require
from ..resources import memory_budget_bytes
from .backends import (LABELS, backend_conf, extra_model_settings, key_path, new_key, server_memory, threads,
                       write_private)
from .ports import pick_spare
from .record import CpuMode, ProcessRecord
from .registry import ended_how, exit_path, server_path

if TYPE_CHECKING:
    from ..config import Config

WORKER = "loradeploy.serving.worker"


def settings_hash(cfg: "Config", model: str) -> str:
    s = cfg.deployment.llamacpp
    blob = json.dumps([cfg.models[model].system_prompt, s.n_ctx, threads(cfg), s.n_gpu_layers, s.n_batch,
                       list(s.extra_args), s.backend, s.parallel])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def worker_env() -> dict[str, str]:
    # llama-server reads LLAMA_ARG_* from the environment: a stray one would quietly make a server other
    # than the config says (deployment.llamacpp.extra_args is the way to add flags).
    env = {k: v for k, v in os.environ.items()
           if k not in ("CONFIG_FILE", "MODEL", "API_KEY") and not k.startswith("LLAMA_ARG_")}
    env["PYTHONPATH"] = proc.package_pythonpath(env)
    return env


def spawn_worker(kind: str, conf_path: Path, log_path: Path, **fields) -> ProcessRecord:
    """Start ``python -m loradeploy.serving.worker KIND CONF`` detached on the config the caller wrote
    (a backend's by start_backend, a proxy's ProxyConf by proxying); for a backend that worker is the
    supervisor of the real server."""
    exit_path(conf_path).unlink(missing_ok=True)  # a verdict left by an earlier server on this port
    server_path(conf_path).unlink(missing_ok=True)
    child = proc.spawn([sys.executable, "-m", WORKER, kind, str(conf_path)], log_path=log_path,
                       env=worker_env(), cwd=conf_path.parent, replace_env=True)
    return ProcessRecord(**child.as_record(), config=str(conf_path), server_record=str(server_path(conf_path)),
                         started_at=time.time(), **fields)


def log_tail(path: Path, lines: int = 50, since: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            start = max(since, f.tell() - 256 * 1024)
            f.seek(start)
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def last_lines(path: Path, since: int, n: int = 3) -> str:
    """The most telling line a server wrote after byte ``since`` (llama.cpp's own error, if any),
    then its last ``n`` lines."""
    lines = [l.strip() for l in log_tail(path, 200, since).splitlines() if l.strip() and not l.startswith("$ ")]
    if not lines:
        return "no output"
    telling = next((l for key in ("error loading model", "llama_model_load: error", "error", "Error")
                    for l in reversed(lines) if key in l and not l.startswith("File ")), None)
    tail = " | ".join(lines[-n:])
    return (f"{telling[:300]} … {tail}" if telling and telling not in tail else tail)[-700:]


@dataclass
class Started:
    record: ProcessRecord        # pid, create_time, config, port, ready_s, cpu mode, key_file
    url: str
    mode: runtime.Mode
    key: str                     # the backend's own api key (only the front proxy and we hold it)


def _wait_ready(alias: str, port: int, key: str, rec: ProcessRecord, log_path: Path, timeout: float) -> None:
    """Ready = /v1/models lists the alias and one chat completion succeeds, within ``timeout``."""
    client = Client(f"http://127.0.0.1:{port}", api_key=key, timeout=5)
    end = time.monotonic() + timeout
    listed, last = False, "no answer yet"
    while time.monotonic() < end:
        if not proc.alive(rec):
            raise _Died(proc.exit_status(rec), ended_how(rec))
        try:
            if not listed:
                ids = client.model_ids(timeout=5)
                listed, last = alias in ids, f"/v1/models lists {ids}"
            if listed:
                r = client.chat({"model": alias, "max_tokens": 1, "temperature": 0,
                                 "messages": [{"role": "user", "content": "ping"}]},
                                timeout=max(5.0, end - time.monotonic()))
                if r.ok and isinstance(r.data, dict) and r.data.get("choices"):
                    return
                last = f"probe completion answered {r.status}: {str(r.data)[:200]}"
        except HttpError as exc:
            last = exc.message
        time.sleep(0.1)
    raise ServingError(f"llama.cpp server for {alias} was not ready within {timeout:.0f}s ({last})",
                       hint=f"raise deployment.llamacpp.startup_timeout_s or see {log_path}")


class _Died(Exception):
    def __init__(self, code: Optional[int], how: Optional[str]):
        self.code, self.how = code, how or proc.describe_exit(code)
        # the supervisor's own exit status mirrors a signal death of the server as 128+N
        self.by_signal = (how or "").startswith("killed by") or (code is not None and (code < 0 or code > 128))


def start_backend(cfg: "Config", alias: str, gguf: Path, *, log_path: Path, conf_dir: Path,
                  taken: set[int] = frozenset(), version: str = "", fmt: str = "", sha256: str = "",
                  loras: Sequence[Path] = (), lora_per_request: bool = True) -> Started:
    """Start a backend serving ``gguf`` as ``alias`` on a spare loopback port and wait until it is ready.

    A backend that dies while starting is reported with how it died and its last log lines. When
    it dies of a signal in the default CPU mode (which passed the probe), it is started once more
    in safe mode and, if that works, the machine's verdict becomes safe.
    """
    s = cfg.deployment.llamacpp
    gguf = Path(gguf)
    for f in (gguf, *map(Path, loras)):
        if not f.is_file():
            raise InputError(f"GGUF {f} not found", hint="quantize or deploy it first")
    extra = extra_model_settings(s.extra_args) if s.backend == "python" else None
    mode = runtime.decide()
    # refused in one line before a process starts (beside a running one, in a switch: it is in use already)
    require(server_memory(cfg, alias, gguf, mode, loras), memory_budget_bytes(cfg.performance.max_memory_gb),
            key="performance.max_memory_gb, deployment.llamacpp.n_ctx / parallel")
    taken = set(taken)
    attempts: list[str] = []
    for _ in range(4):
        port = pick_spare(s.spare_port_range, taken)
        conf_path, key = conf_dir / f"backend-{port}.json", new_key()
        write_private(key_path(conf_path), key + "\n")
        conf = backend_conf(cfg, alias, gguf, port, mode, extra=extra, version=version, fmt=fmt, sha256=sha256,
                            loras=loras, per_request=lora_per_request, key_file=key_path(conf_path))
        write_private(conf_path, json.dumps(conf, indent=2))
        log_from = log_path.stat().st_size if log_path.exists() else 0
        t0 = time.monotonic()
        rec = spawn_worker("backend", conf_path, log_path, port=port, version=version,
                           key_file=str(key_path(conf_path)), cpu_mode=CpuMode(**mode.as_dict()))
        try:
            _wait_ready(alias, port, key, rec, log_path, s.startup_timeout_s)
        except _Died as died:
            how = died.how
            tail = last_lines(log_path, log_from)
            proc.stop(rec, grace=5)
            if any(m in tail.lower() for m in ("address already in use", "couldn't bind")):
                taken.add(port)  # another process took the spare port between the check and the bind
                continue
            attempts.append(f"{mode.name} mode: {how}")
            if mode.name == "default" and died.by_signal:
                mode = runtime.demote(f"default mode passed the probe, but a server of {gguf.name} was {how}")
                continue
            raise ServingError(f"{LABELS[s.backend]} for {alias} exited during startup: {'; '.join(attempts)}; "
                               f"last log lines: {tail}", hint=f"see {log_path}") from None
        except BaseException:
            proc.stop(rec, grace=5)
            raise
        rec = dataclasses.replace(rec, ready_s=round(time.monotonic() - t0, 3))
        return Started(rec, f"http://127.0.0.1:{port}", mode, key)
    why = "; ".join(attempts) or "ports kept being taken"
    raise ServingError(f"{LABELS[s.backend]} for {alias} could not start: {why}", hint=f"see {log_path}")


@dataclass
class TempServer:
    url: str
    pid: int
    runtime: dict      # the CPU mode it ran in and why (runtime.Mode.as_dict())
    record: ProcessRecord
    key: str           # its api key: every client of a temporary server sends it


@contextlib.contextmanager
def temp_server(cfg: "Config", gguf: Path, alias: str, log_path: Path,
                lora: Optional[Path] = None) -> Iterator[TempServer]:
    """Serve ``gguf`` (with ``lora`` applied, adapter mode) on a free loopback port for the duration
    of the block (evaluation's servers)."""
    started = start_backend(cfg, alias, Path(gguf), log_path=log_path, conf_dir=log_path.parent,
                            loras=[Path(lora)] if lora else (), lora_per_request=False)
    try:
        yield TempServer(started.url, started.record.pid, started.mode.as_dict(), started.record, started.key)
    finally:
        proc.stop(started.record, grace=10)
