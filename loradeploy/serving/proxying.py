"""How a model's proxy is pointed at a backend: its two files (``control.ProxyConf`` in proxy.json,
``control.Control`` in control.json, written here only), SIGHUP (or a new proxy on the model's port), the
wait until it reports the bytes of both files as loaded, and the drain before a replaced backend stops.
Used by both switches: one model's own backend (switch) and the shared base server (shared).

A changed ``deployment.llamacpp.api_key`` or proxy limit reaches a running port here: the desired
ProxyConf differs from the one on disk, so proxy.json is rewritten and the proxy re-reads it on SIGHUP."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import HttpError, ResourceError, ServingError
from ..paths import servers_dir as run_dir
from ..tools import proc
from ..tools.openai_http import Client
from .control import Control, ControlError, ProxyConf, load_control, load_proxy_conf, save_control, save_proxy_conf
from .launch import last_lines, spawn_worker
from .limits import proxy_limits
from .ports import client_host, port_holder
from .record import ProcessRecord, ServedModel
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


def serving_sha(cfg: "Config", m: ServedModel, timeout: float = 3.0) -> Optional[str]:
    """sha256 the model's public port is serving now, asked through the proxy; None if no answer."""
    try:
        r = _client(cfg, m.host, m.port, timeout).get(INFO_PATH)
    except HttpError:
        return None
    return r.data.get("sha256") if r.status == 200 and isinstance(r.data, dict) else None


def control_path(cfg: "Config", model: str) -> Path:
    return run_dir(cfg, model) / "control.json"


def conf_path(cfg: "Config", model: str) -> Path:
    return run_dir(cfg, model) / "proxy.json"


def proxy_conf(cfg: "Config", model: str) -> ProxyConf:
    """What the model's proxy should run with now: its port, the clients' key (its sha256 only) and limits."""
    s = cfg.deployment.llamacpp
    key = api_key(cfg)
    return ProxyConf(alias=model, host=s.host, port=cfg.models[model].port, control=str(control_path(cfg, model)),
                     api_key_sha256=hashlib.sha256(key.encode()).hexdigest() if key else None,
                     limits=proxy_limits(cfg))


def _file_sha(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def conf_is_current(cfg: "Config", model: str) -> bool:
    """Whether the model's proxy.json is what the config asks for now (key, limits, port)."""
    try:
        return load_proxy_conf(conf_path(cfg, model)) == proxy_conf(cfg, model)
    except ControlError:
        return False


def _write_conf(cfg: "Config", model: str) -> bool:
    """proxy.json as the config says now; True when it changed (a live proxy must re-read it)."""
    if conf_is_current(cfg, model):
        return False
    save_proxy_conf(proxy_conf(cfg, model), conf_path(cfg, model))
    return True


def _loaded(st: dict, want: dict, conf_changed: bool) -> bool:
    """The proxy's /loradeploy/proxy shows it runs on what we wrote. A proxy that reports no file hashes
    (one from before they existed) passes on its backend port alone, unless its conf changed."""
    for k, v in want.items():
        if k not in st and k.endswith("_sha256") and not (k == "conf_sha256" and conf_changed):
            continue
        if st.get(k) != v:
            return False
    return True


def _wait_proxy(cfg: "Config", model: str, rec: ProcessRecord, log_path: Path, want: dict, conf_changed: bool,
                timeout: float = 15) -> float:
    host, port = cfg.deployment.llamacpp.host, cfg.models[model].port
    want = {**want, "pid": rec.pid, "conf_sha256": _file_sha(conf_path(cfg, model)),
            "control_sha256": _file_sha(control_path(cfg, model))}
    t0 = time.monotonic()
    while time.monotonic() < t0 + timeout:
        st = proxy_state(cfg, host, port, timeout=1)
        if st and _loaded(st, want, conf_changed):
            return time.monotonic() - t0
        if not proc.alive(rec):
            raise ServingError(f"front proxy on port {port} {proc.describe_exit(proc.exit_status(rec))}: "
                               f"{last_lines(log_path, 0)}", hint=f"see {log_path}")
        time.sleep(0.02)
    raise ServingError(f"front proxy on port {port} did not load its new files within {timeout:.0f}s "
                       f"(waiting for {sorted(want)})", hint=f"see {log_path}; `loradeploy serve stop` and "
                       "`serve start` restart it")


def _drain(cfg: "Config", host: str, port: int, backend_port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = proxy_state(cfg, host, port, timeout=1)
        if st is None or not st.get("inflight", {}).get(str(backend_port)):
            return
        time.sleep(0.05)


def check_live_port(cfg: "Config", model: str, m: Optional[ServedModel]) -> bool:
    """True when our own proxy already owns the model's port; raise when anyone else holds it."""
    host, port = cfg.deployment.llamacpp.host, cfg.models[model].port
    if m is not None and proc.alive(m.proxy) and m.port == port and m.host == host:
        return True
    holder = port_holder(host, port)
    if holder:
        raise ResourceError(f"port {port} for model {model} is {holder}",
                            hint=f"stop that process or give models.{model}.port another port")
    return False


def refresh_proxy(cfg: "Config", model: str, proxy: ProcessRecord, log_path: Path) -> bool:
    """Apply a changed api key or limits to the model's live proxy: rewrite proxy.json, SIGHUP, and
    wait until the proxy reports the new file's sha256. True when something changed."""
    if not _write_conf(cfg, model):
        return False
    os.kill(proxy.pid, signal.SIGHUP)
    _wait_proxy(cfg, model, proxy, log_path, {}, conf_changed=True)
    return True


def current_control(cfg: "Config", model: str) -> Optional[Control]:
    """The model's control file as its proxy last got it; None when missing or not one we can read."""
    try:
        return load_control(control_path(cfg, model))
    except ControlError:
        return None


@dataclass
class Pointed:
    """A model's proxy now routing to a new backend, and how to undo that."""
    model: str
    proxy: ProcessRecord
    gap_s: float
    spawned: Optional[ProcessRecord]   # a proxy started for this switch (none was ours before)
    before: Optional[Control]      # the control file it replaced


def point_proxy(cfg: "Config", model: str, m: Optional[ServedModel], ours: bool, control: Control,
                log_path: Path) -> Pointed:
    """Write ``control`` (and the proxy's conf, if the config changed it) and have the model's proxy
    route to ``control.backend_port``: SIGHUP our live proxy, or start one on the model's port."""
    before = current_control(cfg, model) if ours else None
    control = dataclasses.replace(control, switched_at=time.time())
    changed = _write_conf(cfg, model)
    save_control(control, control_path(cfg, model))
    want = {"backend_port": control.backend_port}
    if ours:
        proxy = m.proxy
        t0 = time.monotonic()
        try:
            os.kill(proxy.pid, signal.SIGHUP)
            _wait_proxy(cfg, model, proxy, log_path, want, changed)
        except BaseException:
            undo_proxy(cfg, Pointed(model, proxy, 0.0, None, before))
            raise
        return Pointed(model, proxy, time.monotonic() - t0, None, before)
    proxy = spawn_worker("proxy", conf_path(cfg, model), log_path)
    try:
        gap = _wait_proxy(cfg, model, proxy, log_path, want, changed)
    except BaseException:
        proc.stop(proxy, grace=5)
        raise
    return Pointed(model, proxy, gap, proxy, None)


def undo_proxy(cfg: "Config", p: Pointed) -> None:
    """Point a live proxy back at the backend that was serving (or stop the one this switch started)."""
    if p.spawned:
        proc.stop(p.spawned, grace=5)
        return
    if p.before is not None:
        save_control(p.before, control_path(cfg, p.model))
        try:
            os.kill(p.proxy.pid, signal.SIGHUP)
        except OSError:
            pass


def retire(cfg: "Config", backend: Optional[ProcessRecord], new_pid: int, ports: list[tuple[str, int]]) -> None:
    """Stop a replaced backend once the proxies on ``ports`` ((host, port)) have no request in flight to it."""
    s = cfg.deployment.llamacpp
    if backend is not None and backend.pid != new_pid:
        for host, port in ports:
            _drain(cfg, host, port, backend.port or -1, timeout=max(60.0, s.startup_timeout_s))
        proc.stop(backend)


