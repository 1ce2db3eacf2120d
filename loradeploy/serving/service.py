"""The serving library API that needs no deploy knowledge: stop, status, logs."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional, Sequence

from ..errors import InputError
from ..tools import proc
from .launch import log_tail
from ..paths import server_log_path
from .registry import model_names, read_registry, registry_entry, update_entry
from .shared import release_member
from .switch import model_state

if TYPE_CHECKING:
    from ..config import Config


def serve_stop(cfg: "Config", models: Optional[Sequence[str]] = None) -> list[dict]:
    """Stop each model's proxy and server; the registry keeps what was served for serve start."""
    from ..state import ModelLock

    out = []
    for name in model_names(cfg, models, registered=True):
        entry = registry_entry(cfg, name)
        if not entry:
            out.append({"model": name, "stopped": False, "note": "no server recorded"})
            continue
        with ModelLock(cfg.pipeline.state_dir, name, purpose="serve stop"):
            was = proc.alive(entry.get("proxy")) or proc.alive(entry.get("backend"))
            shared = None
            if entry.get("group"):  # adapter mode: the base's server stops with its last model
                proc.stop(entry.get("proxy"))
                update_entry(cfg, name, state="stopped", stopped_at=time.time())
                shared = release_member(cfg, name, entry["group"])  # the entry keeps its group: serve start rejoins
            else:
                for key in ("proxy", "backend", "pending_backend"):
                    proc.stop(entry.get(key))
                update_entry(cfg, name, state="stopped", stopped_at=time.time())
            out.append({"model": name, "stopped": was, **({"shared_server": shared} if shared else {})})
    return out


def serve_status(cfg: "Config") -> list[dict]:
    """One row per model (configured or recorded): model, version, format, port, pid, state, url, uptime."""
    reg = read_registry(cfg)["models"]
    names = sorted(set(reg) | {n for n, m in cfg.models.items() if m.enabled})
    rows = []
    now = time.time()
    for name in names:
        entry = reg.get(name) or {}
        state, why = model_state(cfg, name, entry)
        backend = entry.get("backend") or {}
        running = state == "running"
        rows.append({
            "model": name, "version": entry.get("version"), "format": entry.get("format"),
            "port": entry.get("port", cfg.models[name].port if name in cfg.models else None),
            "pid": backend.get("pid") if running or state == "unreachable" else None,
            "proxy_pid": (entry.get("proxy") or {}).get("pid") if running else None,
            "backend_port": backend.get("port"), "state": state, "why": why, "url": entry.get("url"),
            "uptime": round(now - backend["started_at"], 1) if running and backend.get("started_at") else None,
            "sha256": entry.get("sha256"), "gguf": entry.get("gguf"),
            "cpu_mode": (entry.get("cpu_mode") or {}).get("describe"),
            "mode": entry.get("mode") or "merged", "shared_server": entry.get("group"),
        })
    return rows


def serve_logs(cfg: "Config", model: str, lines: int = 50) -> str:
    cfg.model(model)
    path = server_log_path(cfg, model)
    if not path.exists():
        raise InputError(f"model {model} has no server log yet ({path})", hint="deploy or start it first")
    return log_tail(path, lines)
