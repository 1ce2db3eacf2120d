"""The one record of what is served: ``state_dir/servers.json`` as typed records, schema-checked on load
and save, written by this module only (``update``) under a lock.

* ``ProcessRecord``: a process of ours (a backend's supervisor or a front proxy): pid and start time (so
  a reused pid is never taken for it), its worker config, and for a backend its loopback port, key file
  and the CPU mode it runs in. It is a read-only mapping too, so ``tools.proc`` (alive, stop) takes it.
* ``ServedModel``: what one model's public port serves, its proxy and, in merged mode, its own backend.
* ``SharedGroup``: adapter mode's shared llama-server of one base and the adapters it holds.

Every other view (status rows, health's and evaluation's endpoints, the proxy's control file, deploy's
live version) is derived from these. A registry written before this module (version 1: untyped dicts)
is migrated on load and written back as version 2 at the next change; a newer or malformed one is
refused in one line naming the file, never replaced by an empty one (it names running servers).

The registry outlives loradeploy (servers are detached); status reconciles it with reality.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from ..errors import ServingError
from ..fsutil import atomic_write_text, exclusive_lock
from .control import MODES  # the serving modes, declared once (serving.strategy.STRATEGIES implements each)

if TYPE_CHECKING:
    from ..config import Config

VERSION = 2
STATES = ("running", "starting", "stopped")


@dataclass(frozen=True)
class CpuMode:
    """The llama.cpp CPU mode a backend runs in, as llamacpp.runtime decided it (Mode.as_dict())."""
    mode: str
    source: str = ""
    why: str = ""
    describe: str = ""
    attempts: list = field(default_factory=list)
    cache_file: Optional[str] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ProcessRecord(Mapping):
    pid: int
    create_time: float
    start_ticks: Optional[int] = None
    config: Optional[str] = None          # the worker's config file
    server_record: Optional[str] = None   # a backend supervisor's record of its server (proc.stop stops both)
    started_at: float = 0.0
    port: Optional[int] = None            # a backend's loopback port
    key_file: Optional[str] = None        # a backend's own api key (serving.backends.key_path); None: keyless
    cpu_mode: Optional[CpuMode] = None
    version: str = ""
    ready_s: Optional[float] = None

    # a read-only mapping, so that tools.proc (alive, stop, exit_status) takes a record as it takes a dict
    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


@dataclass(frozen=True)
class ServedModel:
    model: str
    mode: str                             # one of MODES: which serving strategy owns it
    state: str                            # one of STATES
    version: str
    format: str
    host: str
    port: int
    gguf: str                             # merged: the model's GGUF; adapter: its LoRA GGUF
    sha256: str
    settings_hash: str = ""
    log: str = ""
    backend_kind: str = "llama-server"    # serving.backends.KINDS
    proxy: Optional[ProcessRecord] = None
    backend: Optional[ProcessRecord] = None          # merged mode's own backend (adapter: the group's)
    group: Optional[str] = None           # adapter mode: the SharedGroup's key
    lora_id: Optional[int] = None
    base_gguf: Optional[str] = None
    base_sha256: Optional[str] = None
    started_at: float = 0.0
    switched_at: float = 0.0
    stopped_at: Optional[float] = None

    @property
    def url(self) -> str:
        from .ports import client_host

        return f"http://{client_host(self.host)}:{self.port}"


@dataclass(frozen=True)
class GroupAdapter:
    lora: str
    sha256: str
    version: str
    format: str
    id: int = 0


@dataclass(frozen=True)
class SharedGroup:
    key: str
    base_gguf: str
    base_sha256: str
    format: str
    backend: Optional[ProcessRecord] = None
    settings: str = ""
    # what the running server holds: model -> its adapter, id = --lora order (a member that left stays
    # until the next switch of the group; who is served is each ServedModel's group)
    adapters: dict[str, GroupAdapter] = field(default_factory=dict)
    switched_at: float = 0.0

    @property
    def loaded(self) -> list[list[str]]:
        """[[model, lora sha256], ...] in --lora order: what the running server holds."""
        return [[m, a.sha256] for m, a in sorted(self.adapters.items(), key=lambda kv: kv[1].id)]


@dataclass
class Registry:
    models: dict[str, ServedModel] = field(default_factory=dict)
    groups: dict[str, SharedGroup] = field(default_factory=dict)
    # backends started and not yet switched to, by owner (a model, or "group:KEY"): a loradeploy killed
    # mid-switch leaves no server unknown
    pending: dict[str, ProcessRecord] = field(default_factory=dict)
    updated_at: float = 0.0

    def backend_of(self, m: Optional[ServedModel]) -> Optional[ProcessRecord]:
        """The backend serving ``m``: its own (merged), or its group's shared server (adapter)."""
        if m is None:
            return None
        if m.group:
            g = self.groups.get(m.group)
            return g.backend if g else None
        return m.backend

    def backend_ports(self) -> set[int]:
        recs = [m.backend for m in self.models.values()] + [g.backend for g in self.groups.values()]
        recs += list(self.pending.values())
        return {r.port for r in recs if r is not None and r.port is not None}


# ----------------------------------------------------------------------------- schema

def _build(tp: Any, v: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if v is None and type(None) in args:
            return None
        return _build(next(a for a in args if a is not type(None)), v, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v, where)
    if origin is dict:
        if not isinstance(v, dict):
            raise ValueError(f"{where} must be an object, not {v!r}")
        return {str(k): _build(args[1], x, f"{where}.{k}") for k, x in v.items()}
    if origin is list or tp is list:
        if not isinstance(v, list):
            raise ValueError(f"{where} must be a list, not {v!r}")
        return list(v)
    ok = {int: lambda x: isinstance(x, int) and not isinstance(x, bool),
          float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
          str: lambda x: isinstance(x, str), bool: lambda x: isinstance(x, bool)}[tp]
    if not ok(v):
        raise ValueError(f"{where} must be {tp.__name__}, not {v!r}")
    return float(v) if tp is float else v


def from_dict(cls, data: Any, where: str):
    """``cls`` from JSON data, every field's type checked; unknown fields refused."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _build(hints[name], data[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{where} lacks {name!r}")
    obj = cls(**kwargs)
    for attr, allowed in (("mode", MODES), ("state", STATES)):
        if isinstance(obj, ServedModel) and getattr(obj, attr) not in allowed:
            raise ValueError(f"{where}.{attr} must be one of {allowed}, not {getattr(obj, attr)!r}")
    return obj


def to_dict(reg: Registry) -> dict:
    def each(d: dict) -> dict:
        return {k: dataclasses.asdict(v) for k, v in sorted(d.items())}

    return {"version": VERSION, "updated_at": reg.updated_at, "models": each(reg.models), "groups": each(reg.groups),
            "pending": each(reg.pending)}


def _v1_process(rec: Any, cpu_mode: Any = None) -> Optional[dict]:
    if not isinstance(rec, dict) or not rec.get("pid"):
        return None
    out = {k: rec[k] for k in ("pid", "create_time", "start_ticks", "config", "server_record", "started_at", "port",
                               "version", "ready_s") if rec.get(k) is not None}
    mode = cpu_mode if isinstance(cpu_mode, dict) and cpu_mode.get("mode") else rec.get("cpu_mode")
    if isinstance(mode, dict):
        out["cpu_mode"] = {k: mode[k] for k in ("mode", "source", "why", "describe", "attempts", "cache_file")
                           if k in mode}
    elif isinstance(mode, str) and mode:
        out["cpu_mode"] = {"mode": mode.split()[0], "describe": mode}
    return out


def migrate_v1(data: dict) -> dict:
    """Version 1 (untyped dicts, written by hand in two places) as version 2. Its backends have no key
    file: the next deploy of each model replaces them by locked ones."""
    models, groups, pending = {}, {}, {}
    for name, e in (data.get("models") or {}).items():
        if not isinstance(e, dict):
            raise ValueError(f"models.{name} must be an object")
        if e.get("pending_backend"):
            pending[name] = _v1_process(e["pending_backend"])
        if not e.get("gguf"):
            continue  # never served: only its pending backend mattered
        m = {k: e[k] for k in ("version", "format", "host", "port", "gguf", "sha256", "settings_hash", "log", "group",
                               "lora_id", "base_gguf", "base_sha256", "started_at", "switched_at", "stopped_at")
             if e.get(k) is not None}
        m.update(model=name, mode=e.get("mode") or "merged", state=e.get("state") or "running",
                 backend_kind=e.get("backend_kind") or "llama-server", proxy=_v1_process(e.get("proxy")),
                 backend=None if e.get("group") else _v1_process(e.get("backend"), e.get("cpu_mode")))
        models[name] = m
    for key, g in (data.get("groups") or {}).items():
        if g.get("pending_backend"):
            pending[f"group:{key}"] = _v1_process(g["pending_backend"])
        if not g.get("base_gguf"):
            continue
        groups[key] = {"key": key, "base_gguf": g["base_gguf"], "base_sha256": g["base_sha256"],
                       "format": g.get("format") or "", "backend": _v1_process(g.get("backend")),
                       "settings": g.get("settings") or "", "switched_at": g.get("switched_at") or 0.0,
                       "adapters": {m: {k: a[k] for k in ("lora", "sha256", "version", "format", "id") if k in a}
                                    for m, a in (g.get("adapters") or {}).items()}}
    return {"version": VERSION, "updated_at": data.get("updated_at") or 0.0, "models": models, "groups": groups,
            "pending": {k: v for k, v in pending.items() if v}}


def parse(data: Any, where: str) -> Registry:
    """A registry from its JSON: version 2 checked, version 1 migrated."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("version") == 1:
        data = migrate_v1(data)
    if data.get("version") != VERSION:
        raise ValueError(f"version {data.get('version')!r} is not one this loradeploy reads (1 or {VERSION})")
    def each(cls, name: str) -> dict:
        d = data.get(name, {})
        if not isinstance(d, dict):
            raise ValueError(f"{name} must be an object")
        return {k: from_dict(cls, v, f"{name}.{k}") for k, v in d.items()}

    return Registry(each(ServedModel, "models"), each(SharedGroup, "groups"), each(ProcessRecord, "pending"),
                    float(data.get("updated_at") or 0.0))


# ----------------------------------------------------------------------------- load, the one writer

def registry_path(cfg: "Config") -> Path:
    return Path(cfg.pipeline.state_dir) / "servers.json"


def load(cfg: "Config") -> Registry:
    path = registry_path(cfg)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Registry()
    except OSError as exc:
        raise ServingError(f"server registry {path} is unreadable: {exc}") from None
    try:
        return parse(json.loads(text), str(path))
    except ValueError as exc:
        raise ServingError(f"server registry {path} is not one loradeploy can use: {exc}",
                           hint=f"stop the servers it names by hand, then move {path} aside") from None


def entry(cfg: "Config", model: str) -> Optional[ServedModel]:
    return load(cfg).models.get(model)


@contextlib.contextmanager
def update(cfg: "Config") -> Iterator[Registry]:
    """Read-modify-write the registry under an exclusive lock; written (checked) only if the block succeeds."""
    path = registry_path(cfg)
    with exclusive_lock(path.with_name("servers.lock")):
        reg = load(cfg)
        yield reg
        reg.updated_at = time.time()
        data = to_dict(reg)
        parse(json.loads(json.dumps(data)), str(path))  # what is written must load again
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def change_model(cfg: "Config", model: str, **changes: Any) -> Optional[ServedModel]:
    """Replace fields of a recorded model (None when it is not recorded)."""
    with update(cfg) as reg:
        m = reg.models.get(model)
        if m is not None:
            reg.models[model] = m = dataclasses.replace(m, **changes)
        return m
