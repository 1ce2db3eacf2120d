"""How a model's proxy is pointed at a backend: its control file, SIGHUP (or a new proxy on the
model's port), the wait until it routes there, and the drain before a replaced backend stops.
Used by both switches: one model's own backend (switch) and the shared base server (shared)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import HttpError, ResourceError, ServingError
from ..fsutil import atomic_write_text
from ..paths import servers_dir as run_dir
from ..tools import proc
from ..tools.openai_http import Client
from .launch import last_lines, spawn_worker
from .ports import client_host, port_holder
from .routes import INFO_PATH, PROXY_PATH

if TYPE_CHECKING:
    from ..config import Config


def api_key(cfg: "Config") -> Optional[str]:
    key = cfg.deployment.llamacpp.api_key
    return key.get_secret_value() if key is not None else None


def _client(cfg: "Config", host: str, port: int, timeout: float) -> Client:
    return Client(f"http://{client_host(host)}:{port}", api_key=api_key(cfg), timeout=timeout)


def proxy_state(cfg: "Config", host: str, port: int, timeout: float = 2.0) -> dict | None:
    try:
        r = _client(cfg, host, port, timeout).get(PROXY_PATH)
    except HttpError:
        return None
    return r.data if r.status == 200 and isinstance(r.data, dict) else None


def serving_sha(cfg: "Config", entry: dict, timeout: float = 3.0) -> Optional[str]:
    """sha256 the model's public port is serving now, asked through the proxy; None if no answer."""
    try:
        r = _client(cfg, entry.get("host", "127.0.0.1"), int(entry["port"]), timeout).get(INFO_PATH)
    except (HttpError, KeyError, TypeError, ValueError):
        return None
    return r.data.get("sha256") if r.status == 200 and isinstance(r.data, dict) else None


def _wait_proxy(cfg: "Config", host: str, port: int, backend_port: int, rec: dict, log_path: Path,
                timeout: float = 15) -> float:
    t0 = time.monotonic()
    while time.monotonic() < t0 + timeout:
        st = proxy_state(cfg, host, port, timeout=1)
        if st and st.get("backend_port") == backend_port and st.get("pid") == rec["pid"]:
            return time.monotonic() - t0
        if not proc.alive(rec):
            raise ServingError(f"front proxy on port {port} {proc.describe_exit(proc.exit_status(rec))}: "
                               f"{last_lines(log_path, 0)}", hint=f"see {log_path}")
        time.sleep(0.02)
    raise ServingError(f"front proxy on port {port} did not take backend {backend_port} within {timeout:.0f}s",
                       hint=f"see {log_path}")


def _drain(cfg: "Config", host: str, port: int, backend_port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = proxy_state(cfg, host, port, timeout=1)
        if st is None or not st.get("inflight", {}).get(str(backend_port)):
            return
        time.sleep(0.05)


def check_live_port(cfg: "Config", model: str, entry: dict | None) -> bool:
    """True when our own proxy already owns the model's port; raise when anyone else holds it."""
    host, port = cfg.deployment.llamacpp.host, cfg.models[model].port
    proxy = (entry or {}).get("proxy")
    if proxy and proc.alive(proxy) and entry.get("port") == port and entry.get("host") == host:
        return True
    holder = port_holder(host, port)
    if holder:
        raise ResourceError(f"port {port} for model {model} is {holder}",
                            hint=f"stop that process or give models.{model}.port another port")
    return False


def _proxy_conf(cfg: "Config", model: str, control: Path) -> dict:
    import hashlib

    s = cfg.deployment.llamacpp
    key = api_key(cfg)
    # Only the key's hash reaches disk: the proxy compares hashes of what clients present.
    return {"alias": model, "host": s.host, "port": cfg.models[model].port, "control": str(control),
            "api_key_sha256": hashlib.sha256(key.encode()).hexdigest() if key else None}


@dataclass
class Pointed:
    """A model's proxy now routing to a new backend, and how to undo that."""
    model: str
    proxy: dict
    gap_s: float
    spawned: Optional[dict]        # a proxy started for this switch (none was ours before)
    control: Path
    before: Optional[str]          # the control file it replaced


def point_proxy(cfg: "Config", model: str, entry: dict | None, ours: bool, doc: dict, log_path: Path) -> Pointed:
    """Write ``doc`` as the model's control file and have its proxy route to ``doc['backend_port']``:
    SIGHUP our live proxy, or start one on the model's port."""
    host, port = cfg.deployment.llamacpp.host, cfg.models[model].port
    control = run_dir(cfg, model) / "control.json"
    before = control.read_text() if ours and control.exists() else None
    atomic_write_text(control, json.dumps({**doc, "switched_at": time.time()}))
    if ours:
        proxy = entry["proxy"]
        t0 = time.monotonic()
        try:
            os.kill(int(proxy["pid"]), signal.SIGHUP)
            _wait_proxy(cfg, host, port, doc["backend_port"], proxy, log_path)
        except BaseException:
            undo_proxy(cfg, Pointed(model, proxy, 0.0, None, control, before), entry)
            raise
        return Pointed(model, proxy, time.monotonic() - t0, None, control, before)
    proxy = spawn_worker("proxy", _proxy_conf(cfg, model, control), run_dir(cfg, model) / "proxy.json", log_path)
    proxy["started_at"] = time.time()
    try:
        gap = _wait_proxy(cfg, host, port, doc["backend_port"], proxy, log_path)
    except BaseException:
        proc.stop(proxy, grace=5)
        raise
    return Pointed(model, proxy, gap, proxy, control, None)


def undo_proxy(cfg: "Config", p: Pointed, entry: dict | None) -> None:
    """Point a live proxy back at the backend that was serving (or stop the one this switch started)."""
    if p.spawned:
        proc.stop(p.spawned, grace=5)
        return
    old = (entry or {}).get("backend")
    if old:
        atomic_write_text(p.control, p.before or json.dumps({"backend_port": old["port"],
                                                               "version": entry.get("version")}))
        with contextlib.suppress(OSError):
            os.kill(int(p.proxy["pid"]), signal.SIGHUP)


def retire(cfg: "Config", backend: dict | None, new_pid: int, ports: list[tuple[str, int]]) -> None:
    """Stop a replaced backend once the proxies on ``ports`` ((host, port)) have no request in flight to it."""
    s = cfg.deployment.llamacpp
    if backend and backend.get("pid") != new_pid:
        for host, port in ports:
            _drain(cfg, host, port, backend.get("port", -1), timeout=max(60.0, s.startup_timeout_s))
        proc.stop(backend)


