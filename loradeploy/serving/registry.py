"""Views of what is served, derived from the one record (serving.record): each deployed model's public
``Endpoint``, the model names a command acts on, and how a backend ended (its supervisor's files).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from ..tools.proc import describe_exit, exit_status
from . import record

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("loradeploy.serving")
log.addHandler(logging.NullHandler())  # a library: messages go to the CLI's handlers or nowhere


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


def model_names(cfg: "Config", models: Optional[Sequence[str]], *, registered: bool) -> list[str]:
    if models:
        for m in models:
            cfg.model(m)
        return list(models)
    if registered:
        return sorted(record.load(cfg).models)
    return [n for n, m in cfg.models.items() if m.enabled]


def endpoints(cfg: "Config", models: Optional[Sequence[str]] = None) -> list[Endpoint]:
    """Every deployed model's public endpoint as recorded (alive or not: health decides that)."""
    reg = record.load(cfg)
    out = []
    for name in model_names(cfg, models, registered=True):
        m = reg.models.get(name)
        if m is None:
            continue
        backend = reg.backend_of(m)
        pid = backend.pid if backend is not None and m.state != "stopped" else 0
        out.append(Endpoint(name, m.version, m.format, m.url, m.port, pid, m.gguf, m.sha256))
    return out


def read_registry(cfg: "Config") -> dict:
    """The record as plain JSON data, each model's ``backend`` resolved (its own, or its shared group's):
    a read-only view for scripts and benchmarks (bench/)."""
    reg = record.load(cfg)
    data = record.to_dict(reg)
    for name, m in reg.models.items():
        backend = reg.backend_of(m)
        data["models"][name]["backend"] = dataclasses.asdict(backend) if backend is not None else None
    return data


def exit_path(conf_path: Path | str) -> Path:
    """Where a backend's supervisor writes how the server ended (next to the backend's config)."""
    conf_path = Path(conf_path)
    return conf_path.with_name(conf_path.stem + ".exit.json")


def server_path(conf_path: Path | str) -> Path:
    """Where a backend's supervisor records its server (pid, start times): proc.stop() of the
    supervisor's record (its ``server_record``) stops a server that outlived the supervisor."""
    conf_path = Path(conf_path)
    return conf_path.with_name(conf_path.stem + ".server.json")


def recorded_exit(rec: Mapping | None) -> Optional[str]:
    """"killed by SIGSEGV" / "exited with code 1" for a backend that ended, if its supervisor said so."""
    if not rec or not rec.get("config"):
        return None
    try:
        return json.loads(exit_path(rec["config"]).read_text()).get("how")
    except (OSError, ValueError, AttributeError):
        return None


def ended_how(rec: Mapping | None) -> Optional[str]:
    """How a backend ended: its supervisor's record, else our own child's exit status; None if unknown."""
    how = recorded_exit(rec)
    if how is None and exit_status(rec) is not None:
        how = describe_exit(exit_status(rec))
    return how
