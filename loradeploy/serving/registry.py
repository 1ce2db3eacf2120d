"""Which server processes serve which model: state_dir/servers.json, read-modify-written under a lock.

The registry outlives loradeploy (servers are detached); status reconciles it with reality.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from ..fsutil import atomic_write_text, exclusive_lock
from ..tools.proc import describe_exit, exit_status

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("loradeploy.serving")
log.addHandler(logging.NullHandler())  # a library: messages go to the CLI's handlers or nowhere
REGISTRY_VERSION = 1


@dataclass(frozen=True)
class Endpoint:
    model: str
    version: str
    format: str
    base_url: str
    port: int
    pid: int            # the backend process holding the model (0 when stopped)
    gguf_path: str
    sha256: str


def registry_path(cfg: "Config") -> Path:
    return Path(cfg.pipeline.state_dir) / "servers.json"


def read_registry(cfg: "Config") -> dict:
    path = registry_path(cfg)
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            return data
        log.warning("server registry %s has no models mapping; starting a new one", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("server registry %s is unreadable (%s); starting a new one", path, exc)
    return {"version": REGISTRY_VERSION, "models": {}}


@contextlib.contextmanager
def locked_registry(cfg: "Config") -> Iterator[dict]:
    """Read-modify-write the registry under an exclusive lock; written only if the block succeeds."""
    path = registry_path(cfg)
    with exclusive_lock(path.with_name("servers.lock")):
        data = read_registry(cfg)
        yield data
        data["updated_at"] = time.time()
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def registry_entry(cfg: "Config", model: str) -> dict | None:
    return read_registry(cfg)["models"].get(model)


def update_entry(cfg: "Config", model: str, **changes: Any) -> dict:
    with locked_registry(cfg) as reg:
        entry = reg["models"].setdefault(model, {"model": model})
        entry.update(changes)
        return dict(entry)


def model_names(cfg: "Config", models: Optional[Sequence[str]], *, registered: bool) -> list[str]:
    if models:
        for m in models:
            cfg.model(m)
        return list(models)
    if registered:
        return sorted(read_registry(cfg)["models"])
    return [n for n, m in cfg.models.items() if m.enabled]


def endpoints(cfg: "Config", models: Optional[Sequence[str]] = None) -> list[Endpoint]:
    """Every deployed model's public endpoint as recorded (alive or not: health decides that)."""
    reg = read_registry(cfg)["models"]
    out = []
    for name in model_names(cfg, models, registered=True):
        e = reg.get(name)
        if not e or not e.get("gguf"):
            continue
        backend = e.get("backend") or {}
        pid = int(backend.get("pid") or 0) if e.get("state") != "stopped" else 0
        out.append(Endpoint(name, e["version"], e["format"], e["url"], int(e["port"]), pid, e["gguf"], e["sha256"]))
    return out


def exit_path(conf_path: Path | str) -> Path:
    """Where a backend's supervisor writes how the server ended (next to the backend's config)."""
    conf_path = Path(conf_path)
    return conf_path.with_name(conf_path.stem + ".exit.json")


def server_path(conf_path: Path | str) -> Path:
    """Where a backend's supervisor records its server (pid, start times): proc.stop() of the
    supervisor's record (its ``server_record``) stops a server that outlived the supervisor."""
    conf_path = Path(conf_path)
    return conf_path.with_name(conf_path.stem + ".server.json")


def recorded_exit(rec: dict | None) -> Optional[str]:
    """"killed by SIGSEGV" / "exited with code 1" for a backend that ended, if its supervisor said so."""
    if not rec or not rec.get("config"):
        return None
    try:
        return json.loads(exit_path(rec["config"]).read_text()).get("how")
    except (OSError, ValueError, AttributeError):
        return None


def ended_how(rec: dict | None) -> Optional[str]:
    """How a backend ended: its supervisor's record, else our own child's exit status; None if unknown."""
    how = recorded_exit(rec)
    if how is None and exit_status(rec) is not None:
        how = describe_exit(exit_status(rec))
    return how
