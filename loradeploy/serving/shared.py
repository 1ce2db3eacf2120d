"""Adapter mode (serving.strategy): one llama-server per base GGUF holds every adapter deployed on that
base (``--lora`` each, all at scale 0), and every model keeps its own public port, whose proxy writes
that model's ``lora`` selection (and system prompt) into each request.

The record's ``groups`` (record.SharedGroup) maps a base (the first 16 hex digits of its sha256) to that
server and the adapters it holds; each member's ServedModel names its group.

llama-server loads adapters only at start, so deploying v2 of one adapter starts a new server of the
same base with every other member's adapter unchanged and the new one in its place, on a spare port;
once it is ready every member's proxy is pointed at it (each keeps its own adapter, version and
system prompt) and the old server stops after its requests in flight: no request fails on any port.
For the length of the switch two servers of the base are in memory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..fsutil import exclusive_lock
from ..paths import group_dir
from ..tools import proc
from . import record
from .backends import read_key
from .control import Control
from .launch import settings_hash, start_backend, threads
from .proxying import (Pointed, check_live_port, current_control, point_proxy, refresh_proxy, retire, serving_sha,
                       undo_proxy)
from .record import GroupAdapter, Registry, ServedModel, SharedGroup
from .strategy import Offer, Progress, leave_previous

if TYPE_CHECKING:
    from ..config import Config


def group_key(base_sha256: str) -> str:
    return base_sha256[:16]


def backend_settings(cfg: "Config") -> str:
    """What the shared server itself depends on (the system prompts are the proxies' business)."""
    s = cfg.deployment.llamacpp
    blob = json.dumps([s.n_ctx, threads(cfg), s.n_gpu_layers, s.n_batch, list(s.extra_args), s.backend, s.parallel])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def group_lock(cfg: "Config", key: str):
    """Deploys of different models on one base take turns (each holds only its own model lock)."""
    return exclusive_lock(group_dir(cfg, key) / "lock")


def group_log(cfg: "Config", key: str) -> Path:
    return group_dir(cfg, key) / "server.log"


def _members(cfg: "Config", reg: Registry, key: str, skip: str) -> dict[str, GroupAdapter]:
    """The adapters that stay on the base's server: members still configured, recorded in this
    group and not stopped."""
    group = reg.groups.get(key)
    out = {}
    for m, a in (group.adapters if group else {}).items():
        e = reg.models.get(m)
        if m != skip and m in cfg.models and e is not None and e.group == key and e.state != "stopped":
            out[m] = a
    return out


def _control(cfg: "Config", m: str, a: GroupAdapter, port: int, key: str, base: str, base_sha: str) -> Control:
    return Control(backend_port=port, version=a.version, format=a.format, sha256=a.sha256, gguf=a.lora,
                   base_gguf=base, base_sha256=base_sha, mode="adapter", backend="llama-server", backend_key=key,
                   lora=[{"id": a.id, "scale": 1.0}], system_prompt=cfg.models[m].system_prompt or "")


def _unchanged(cfg: "Config", model: str, m: Optional[ServedModel], key: str, backend_key: str,
               offer: Offer) -> bool:
    ctl = current_control(cfg, model)
    return (m is not None and m.group == key and m.version == offer.version and ctl is not None
            and ctl.backend_key == backend_key and m.settings_hash == settings_hash(cfg, model)
            and serving_sha(cfg, m) == offer.sha256)


class AdapterStrategy:
    mode = "adapter"

    def switch(self, cfg: "Config", model: str, offer: Offer, progress: Optional[Progress] = None) -> dict:
        """Serve the LoRA GGUF ``offer.gguf`` on ``offer.base_gguf`` at the model's port, every other adapter on
        that base untouched; the caller holds the model's lock."""
        s = cfg.deployment.llamacpp
        base, base_sha = Path(offer.base_gguf), offer.base_sha256
        key = group_key(base_sha)
        with group_lock(cfg, key):
            reg = record.load(cfg)
            group, was = reg.groups.get(key), reg.models.get(model)
            ours = check_live_port(cfg, model, was)
            members = {m: GroupAdapter(a.lora, a.sha256, a.version, a.format) for m, a in
                       _members(cfg, reg, key, skip=model).items()}
            members[model] = GroupAdapter(str(offer.gguf), offer.sha256, offer.version, offer.format)
            order = sorted(members)
            members = {m: dataclasses.replace(members[m], id=i) for i, m in enumerate(order)}
            old = group.backend if group else None
            old_key = read_key(old.key_file) if old else None  # a keyless server (from before keys) is replaced
            reuse = (proc.alive(old) and old_key is not None and group.base_sha256 == base_sha
                     and group.loaded == [[m, members[m].sha256] for m in order]
                     and group.settings == backend_settings(cfg))
            reloaded = ours and refresh_proxy(cfg, model, was.proxy, group_log(cfg, key))  # key or limits, first
            if reuse and ours and _unchanged(cfg, model, was, key, old_key, offer):
                return {"action": "reconfigured" if reloaded else "unchanged", "url": was.url,
                        "port": cfg.models[model].port, "pid": old.pid, "backend_port": old.port, "group": key,
                        "adapters": order}
            if progress:
                progress(f"starting the {key[:8]} base server with {len(order)} adapter(s)", 0, 3)
            if reuse:
                backend, mode, backend_key = old, None, old_key
            else:
                started = start_backend(cfg, f"base-{key[:12]}", base, log_path=group_log(cfg, key),
                                        conf_dir=group_dir(cfg, key), taken=reg.backend_ports(),
                                        version=offer.version, fmt=offer.format, sha256=base_sha,
                                        loras=[Path(members[m].lora) for m in order])
                backend, mode, backend_key = started.record, started.mode, started.key
                with record.update(cfg) as r:  # known before any port moves: a crash leaves no unknown server
                    r.pending[f"group:{key}"] = backend
            pointed: list[Pointed] = []
            try:
                for i, m in enumerate(order):
                    if progress:
                        progress(f"pointing {m} (port {cfg.models[m].port}) at the new server", 1 + i / len(order), 3)
                    e = reg.models.get(m)
                    m_ours = ours if m == model else check_live_port(cfg, m, e)
                    doc = _control(cfg, m, members[m], backend.port, backend_key, str(base), base_sha)
                    pointed.append(point_proxy(cfg, m, e, m_ours, doc, group_log(cfg, key)))
            except BaseException:
                for p in reversed(pointed):
                    undo_proxy(cfg, p)
                if not reuse:
                    proc.stop(backend, grace=5)
                    with record.update(cfg) as r:
                        r.pending.pop(f"group:{key}", None)
                raise
            now = time.time()
            with record.update(cfg) as r:
                r.pending.pop(f"group:{key}", None)
                for m, p in zip(order, pointed):
                    prev, a = reg.models.get(m), members[m]
                    r.models[m] = ServedModel(
                        model=m, mode=self.mode, state="running", version=a.version, format=a.format, host=s.host,
                        port=cfg.models[m].port, gguf=a.lora, sha256=a.sha256, settings_hash=settings_hash(cfg, m),
                        log=str(group_log(cfg, key)), backend_kind="llama-server", proxy=p.proxy, group=key,
                        lora_id=a.id, base_gguf=str(base), base_sha256=base_sha,
                        started_at=prev.started_at if prev is not None and prev.started_at else now, switched_at=now)
                r.groups[key] = SharedGroup(key=key, base_gguf=str(base), base_sha256=base_sha, format=offer.format,
                                            backend=backend, settings=backend_settings(cfg), adapters=members,
                                            switched_at=now)
            if progress:
                progress("stopping the replaced server", 2, 3)
            ports = [(s.host, cfg.models[m].port) for m in order]
            if not reuse:
                retire(cfg, old, backend.pid, ports)
            i = order.index(model)
            leave_previous(cfg, model, was, self.mode, key, backend.pid, ports[i:i + 1])
            for p in pointed:
                prev = reg.models.get(p.model)
                if p.spawned and prev is not None and prev.proxy is not None and prev.proxy.pid != p.proxy.pid:
                    proc.stop(prev.proxy)  # a proxy of ours that had lost its port
            if progress:
                progress(f"{model} {offer.version} serving on the shared {key[:8]} server", 3, 3)
            mine = pointed[i]
            return {"action": "switched" if proc.alive(old) or was else "started", "url": r.models[model].url,
                    "port": cfg.models[model].port, "pid": backend.pid, "backend": "llama-server",
                    "backend_port": backend.port, "proxy_pid": mine.proxy.pid, "group": key, "adapters": order,
                    "lora_id": i, "ready_s": backend.ready_s, "switch_s": round(mine.gap_s, 4),
                    "restarted_base": not reuse, "cpu_mode": mode.describe() if mode else None}

    def stop(self, cfg: "Config", model: str, m: ServedModel) -> dict:
        proc.stop(m.proxy)
        record.change_model(cfg, model, state="stopped", stopped_at=time.time())
        shared = self.release(cfg, model, m, -1, [])  # the record keeps its group: serve start rejoins
        return {"shared_server": shared} if shared else {}

    def release(self, cfg: "Config", model: str, m: ServedModel, keep_pid: int,
                ports: list[tuple[str, int]]) -> Optional[dict]:
        """``model`` leaves the base's server; the last one out stops it. The others keep serving (its
        adapter stays loaded at scale 0, and in the group's record of what the server holds, until the
        next switch of the group)."""
        key = m.group
        with group_lock(cfg, key):
            reg = record.load(cfg)
            group = reg.groups.get(key)
            if group is None:
                return None
            left = _members(cfg, reg, key, skip=model)
            if not left:
                port = cfg.models[model].port if model in cfg.models else None
                retire(cfg, group.backend, keep_pid, [(cfg.deployment.llamacpp.host, port)] if port else [])
                proc.stop(reg.pending.get(f"group:{key}"))
                with record.update(cfg) as r:
                    r.groups.pop(key, None)
                    r.pending.pop(f"group:{key}", None)
            return {"group": key, "stopped": not left, "left": sorted(left)}
