"""The serving library API that needs no deploy knowledge: stop, status, logs."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional, Sequence

from ..errors import InputError
from ..paths import server_log_path
from ..tools import proc
from . import record
from .launch import log_tail
from .registry import model_names
from .strategy import model_state, strategy_for

if TYPE_CHECKING:
    from ..config import Config


def serve_stop(cfg: "Config", models: Optional[Sequence[str]] = None) -> list[dict]:
    """Stop each model's proxy and server; the record keeps what was served for serve start."""
    from ..state import ModelLock

    out = []
    for name in model_names(cfg, models, registered=True):
        reg = record.load(cfg)
        m = reg.models.get(name)
        if m is None:
            out.append({"model": name, "stopped": False, "note": "no server recorded"})
            continue
        with ModelLock(cfg.pipeline.state_dir, name, purpose="serve stop"):
            was = proc.alive(m.proxy) or proc.alive(reg.backend_of(m))
            out.append({"model": name, "stopped": was, **strategy_for(m.mode).stop(cfg, name, m)})
    return out


def serve_status(cfg: "Config") -> list[dict]:
    """One row per model (configured or recorded): model, version, format, port, pid, state, url, uptime."""
    reg = record.load(cfg)
    names = sorted(set(reg.models) | {n for n, m in cfg.models.items() if m.enabled})
    rows = []
    now = time.time()
    for name in names:
        m = reg.models.get(name)
        state, why = model_state(cfg, reg, name)
        backend = reg.backend_of(m)
        running = state == "running"
        rows.append({
            "model": name, "version": m and m.version, "format": m and m.format,
            "port": m.port if m else cfg.models[name].port if name in cfg.models else None,
            "pid": backend.pid if backend and (running or state == "unreachable") else None,
            "proxy_pid": m.proxy.pid if running and m.proxy else None,
            "backend_port": backend.port if backend else None, "state": state, "why": why,
            "url": m and m.url,
            "uptime": round(now - backend.started_at, 1) if running and backend.started_at else None,
            "sha256": m and m.sha256, "gguf": m and m.gguf,
            "cpu_mode": backend.cpu_mode.describe if backend and backend.cpu_mode else None,
            "mode": m.mode if m else "merged", "shared_server": m and m.group,
        })
    return rows


def serve_logs(cfg: "Config", model: str, lines: int = 50) -> str:
    cfg.model(model)
    path = server_log_path(cfg, model)
    if not path.exists():
        raise InputError(f"model {model} has no server log yet ({path})", hint="deploy or start it first")
    return log_tail(path, lines)
