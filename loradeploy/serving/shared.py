"""Adapter mode's serving: one llama-server per base GGUF holds every adapter deployed on that base
(``--lora`` each, all at scale 0), and every model keeps its own public port, whose proxy writes that
model's ``lora`` selection (and system prompt) into each request.

The registry's ``groups`` maps a base (the first 16 hex digits of its sha256) to that server:
``{base_gguf, base_sha256, format, backend, loaded: [[model, lora sha256], ...], adapters: {model:
{lora, sha256, version, format, id}}, settings}``; each member's own entry names the group.

llama-server loads adapters only at start, so deploying v2 of one adapter starts a new server of the
same base with every other member's adapter unchanged and the new one in its place, on a spare port;
once it is ready every member's proxy is pointed at it (each keeps its own adapter, version and
system prompt) and the old server stops after its requests in flight: no request fails on any port.
For the length of the switch two servers of the base are in memory.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ..fsutil import exclusive_lock
from ..paths import group_dir
from ..tools import proc
from .backends import read_key
from .control import Control
from .launch import settings_hash, start_backend, threads
from .ports import client_host
from .proxying import (Pointed, check_live_port, current_control, point_proxy, refresh_proxy, retire, serving_sha,
                       undo_proxy)
from .registry import locked_registry, read_registry

if TYPE_CHECKING:
    from ..config import Config

Progress = Callable[[str, float, float], None]


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


def _members(cfg: "Config", reg: dict, key: str, group: dict, skip: str) -> dict[str, dict]:
    """The adapters that stay on the base's server: members still configured, recorded in this
    group and not stopped."""
    out = {}
    for m, a in (group.get("adapters") or {}).items():
        e = reg["models"].get(m) or {}
        if m != skip and m in cfg.models and e.get("group") == key and e.get("state") != "stopped":
            out[m] = {k: a[k] for k in ("lora", "sha256", "version", "format")}
    return out


def _control(cfg: "Config", m: str, a: dict, i: int, port: int, key: str, base: str, base_sha: str) -> Control:
    return Control(backend_port=port, version=a["version"], format=a["format"], sha256=a["sha256"], gguf=a["lora"],
                   base_gguf=base, base_sha256=base_sha, mode="adapter", backend="llama-server", backend_key=key,
                   lora=[{"id": i, "scale": 1.0}], system_prompt=cfg.models[m].system_prompt or "")


def switch_adapter(cfg: "Config", model: str, *, lora: Path, lora_sha: str, version: str, fmt: str,
                   base: Path, base_sha: str, progress: Optional[Progress] = None) -> dict:
    """Serve ``lora`` on ``base`` at the model's port, every other adapter on that base untouched;
    the caller holds the model's lock."""
    s = cfg.deployment.llamacpp
    key = group_key(base_sha)
    with group_lock(cfg, key):
        reg = read_registry(cfg)
        group = (reg.get("groups") or {}).get(key) or {}
        entry = reg["models"].get(model)
        ours = check_live_port(cfg, model, entry)
        members = _members(cfg, reg, key, group, skip=model)
        members[model] = {"lora": str(lora), "sha256": lora_sha, "version": version, "format": fmt}
        order = sorted(members)
        loaded = [[m, members[m]["sha256"]] for m in order]
        old = group.get("backend")
        url = f"http://{client_host(s.host)}:{cfg.models[model].port}"
        old_key = read_key((old or {}).get("key_file"))  # a keyless server (started before keys) is replaced
        reuse = (proc.alive(old) and old_key is not None and group.get("base_sha256") == base_sha
                 and group.get("loaded") == loaded and group.get("settings") == backend_settings(cfg))
        reloaded = ours and refresh_proxy(cfg, model, entry["proxy"], group_log(cfg, key))  # key or limits, first
        ctl = current_control(cfg, model)
        if (reuse and ours and entry.get("group") == key and entry.get("version") == version and ctl is not None
                and ctl.backend_key == old_key and entry.get("settings_hash") == settings_hash(cfg, model)
                and serving_sha(cfg, entry) == lora_sha):
            return {"action": "reconfigured" if reloaded else "unchanged", "url": url,
                    "port": cfg.models[model].port, "pid": old["pid"], "backend_port": old["port"], "group": key,
                    "adapters": order}
        if progress:
            progress(f"starting the {key[:8]} base server with {len(order)} adapter(s)", 0, 3)
        if reuse:
            backend, mode, backend_key = old, None, old_key
        else:
            taken = {e.get("backend", {}).get("port") for e in reg["models"].values()}
            taken |= {g.get("backend", {}).get("port") for g in (reg.get("groups") or {}).values()}
            started = start_backend(cfg, f"base-{key[:12]}", base, log_path=group_log(cfg, key),
                                    conf_dir=group_dir(cfg, key), taken=taken - {None}, version=version,
                                    fmt=fmt, sha256=base_sha, loras=[Path(members[m]["lora"]) for m in order])
            backend, mode, backend_key = started.record, started.mode, started.key
            with locked_registry(cfg) as r:  # known before any port moves: a crash leaves no unknown server
                r.setdefault("groups", {}).setdefault(key, {})["pending_backend"] = backend
        pointed: list[tuple[Pointed, Optional[dict]]] = []
        try:
            for i, m in enumerate(order):
                if progress:
                    progress(f"pointing {m} (port {cfg.models[m].port}) at the new server", 1 + i / len(order), 3)
                e = reg["models"].get(m) if m != model else entry
                m_ours = ours if m == model else check_live_port(cfg, m, e)
                doc = _control(cfg, m, members[m], i, backend["port"], backend_key, str(base), base_sha)
                pointed.append((point_proxy(cfg, m, e, m_ours, doc, group_log(cfg, key)), e))
        except BaseException:
            for p, _ in reversed(pointed):
                undo_proxy(cfg, p)
            if not reuse:
                proc.stop(backend, grace=5)
                with locked_registry(cfg) as r:
                    r.setdefault("groups", {}).setdefault(key, {}).pop("pending_backend", None)
            raise
        now = time.time()
        previous = {m: (reg["models"].get(m) or {}) for m in order}
        with locked_registry(cfg) as r:
            for i, (m, (p, _)) in enumerate(zip(order, pointed)):
                a = members[m]
                r["models"].setdefault(m, {"model": m}).update(
                    version=a["version"], format=a["format"], host=s.host, port=cfg.models[m].port, gguf=a["lora"],
                    sha256=a["sha256"], base_gguf=str(base), base_sha256=base_sha, mode="adapter", group=key,
                    lora_id=i, settings_hash=settings_hash(cfg, m), proxy=p.proxy, backend=backend,
                    pending_backend=None, state="running", backend_kind="llama-server",
                    url=f"http://{client_host(s.host)}:{cfg.models[m].port}", log=str(group_log(cfg, key)),
                    switched_at=now, cpu_mode=mode.as_dict() if mode else previous[m].get("cpu_mode"),
                    started_at=previous[m].get("started_at") or now)
            r.setdefault("groups", {})[key] = {
                "base_gguf": str(base), "base_sha256": base_sha, "format": fmt, "backend": backend,
                "loaded": loaded, "settings": backend_settings(cfg), "switched_at": now,
                "adapters": {m: {**members[m], "id": i} for i, m in enumerate(order)}}
        if progress:
            progress("stopping the replaced server", 2, 3)
        ports = [(s.host, cfg.models[m].port) for m in order]
        if not reuse:
            retire(cfg, old, backend["pid"], ports)
        was = entry or {}
        if was.get("group") and was["group"] != key:
            release_member(cfg, model, was["group"])
        elif not was.get("group") and was.get("backend"):  # the model served merged before: its own server goes
            retire(cfg, was["backend"], backend["pid"], ports[order.index(model):order.index(model) + 1])
        for p, _ in pointed:
            if p.spawned and (previous[p.model].get("proxy") or {}).get("pid") not in (None, p.proxy["pid"]):
                proc.stop(previous[p.model]["proxy"])  # a proxy of ours that had lost its port
        if progress:
            progress(f"{model} {version} serving on the shared {key[:8]} server", 3, 3)
        mine = next(p for p, _ in pointed if p.model == model)
        return {"action": "switched" if proc.alive(old) or was else "started", "url": url,
                "port": cfg.models[model].port, "pid": backend["pid"], "backend": "llama-server",
                "backend_port": backend["port"], "proxy_pid": mine.proxy["pid"], "group": key, "adapters": order,
                "lora_id": order.index(model), "ready_s": backend.get("ready_s"), "switch_s": round(mine.gap_s, 4),
                "restarted_base": not reuse}


def release_member(cfg: "Config", model: str, key: str) -> Optional[dict]:
    """``model`` leaves the base's server; the last one out stops it. The others keep serving (its
    adapter stays loaded at scale 0 until the next switch of the group)."""
    with group_lock(cfg, key):
        reg = read_registry(cfg)
        group = (reg.get("groups") or {}).get(key)
        if not group:
            return None
        left = _members(cfg, reg, key, group, skip=model)
        if not left:
            s = cfg.deployment.llamacpp
            port = cfg.models[model].port if model in cfg.models else None
            retire(cfg, group.get("backend"), -1, [(s.host, port)] if port else [])
            proc.stop(group.get("pending_backend"))
        with locked_registry(cfg) as r:
            g = r.setdefault("groups", {}).get(key)
            if g is not None:
                g.get("adapters", {}).pop(model, None)
                if not left:
                    r["groups"].pop(key)
        return {"group": key, "stopped": not left, "left": sorted(left)}


def group_log(cfg: "Config", key: str) -> Path:
    return group_dir(cfg, key) / "server.log"
