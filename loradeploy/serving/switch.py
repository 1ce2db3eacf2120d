"""A model's public port: a front proxy that forwards to the backend of the live version.

A new version starts on a spare port (launch.start_backend) and must pass the readiness probe;
only then does the proxy route new requests to it (SIGHUP re-reads its control file); the old
backend stops once its requests in flight are done. A switch never refuses or cuts a request, and a
backend that fails its probe leaves the old one serving.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import HttpError, ResourceError, ServingError
from ..fsutil import atomic_write_text
from ..tools import proc
from ..tools.openai_http import Client
from .launch import settings_hash, spawn_worker, start_backend, last_lines
from .ports import client_host, port_holder
from .routes import INFO_PATH, PROXY_PATH
from ..paths import servers_dir as run_dir, server_log_path
from .registry import ended_how, read_registry, registry_entry, update_entry

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


def switch(cfg: "Config", model: str, *, gguf: Path, version: str, fmt: str, sha256: str,
           progress: Callable[[str, float, float], None] | None = None) -> dict:
    """Serve ``gguf`` on the model's port with no failed request; the caller holds the model lock."""
    s = cfg.deployment.llamacpp
    host, port = s.host, cfg.models[model].port
    shash = settings_hash(cfg, model)
    entry = registry_entry(cfg, model)
    ours = check_live_port(cfg, model, entry)
    old_backend = (entry or {}).get("backend")
    url = f"http://{client_host(host)}:{port}"
    if (ours and proc.alive(old_backend) and entry.get("sha256") == sha256 and entry.get("settings_hash") == shash
            and entry.get("version") == version and serving_sha(cfg, entry) == sha256):
        return {"action": "unchanged", "url": url, "port": port, "pid": old_backend["pid"],
                "backend_port": old_backend["port"], "cpu_mode": old_backend.get("cpu_mode")}
    replacing = proc.alive(old_backend)
    if progress:
        progress(f"starting {model} {version} on a spare port", 0, 3)
    taken = {e.get("backend", {}).get("port") for e in read_registry(cfg)["models"].values()} - {None}
    log_path = server_log_path(cfg, model)
    started = start_backend(cfg, model, gguf, log_path=log_path, conf_dir=run_dir(cfg, model), taken=taken,
                            version=version, fmt=fmt, sha256=sha256)
    backend = started.record
    # Recorded before the switch, so a loradeploy killed mid-switch leaves no unknown server behind.
    update_entry(cfg, model, pending_backend=backend)
    control = run_dir(cfg, model) / "control.json"
    before = control.read_text() if ours and control.exists() else None
    spawned = None
    try:
        if progress:
            progress(f"switching port {port} to {version}", 1, 3)
        # Everything the proxy answers for every kind of backend: what is served (/loradeploy/info)
        # and the model's system prompt, applied to chat requests on their way through.
        atomic_write_text(control, json.dumps({
            "backend_port": backend["port"], "version": version, "format": fmt, "sha256": sha256,
            "gguf": str(gguf), "backend": s.backend, "system_prompt": cfg.models[model].system_prompt or "",
            "switched_at": time.time()}))
        if ours:
            proxy = entry["proxy"]
            t0 = time.monotonic()
            os.kill(int(proxy["pid"]), signal.SIGHUP)
            _wait_proxy(cfg, host, port, backend["port"], proxy, log_path)
            gap = time.monotonic() - t0
        else:
            proxy = spawned = spawn_worker("proxy", _proxy_conf(cfg, model, control),
                                           run_dir(cfg, model) / "proxy.json", log_path)
            proxy["started_at"] = time.time()
            gap = _wait_proxy(cfg, host, port, backend["port"], proxy, log_path)
    except BaseException:
        if ours and old_backend:  # point the live proxy back at the version that was serving
            atomic_write_text(control, before or json.dumps({"backend_port": old_backend["port"],
                                                               "version": entry["version"]}))
            with contextlib.suppress(OSError):
                os.kill(int(entry["proxy"]["pid"]), signal.SIGHUP)
        if spawned:
            proc.stop(spawned, grace=5)
        proc.stop(backend, grace=5)
        update_entry(cfg, model, pending_backend=None)
        raise
    old_proxy = (entry or {}).get("proxy") if not ours else None
    update_entry(cfg, model, version=version, format=fmt, host=host, port=port, gguf=str(gguf), sha256=sha256,
                 settings_hash=shash, proxy=proxy, backend=backend, pending_backend=None, state="running",
                 url=url, log=str(log_path), switched_at=time.time(), cpu_mode=started.mode.as_dict(),
                 backend_kind=s.backend,
                 started_at=entry.get("started_at") if ours and entry else time.time())
    if progress:
        progress(f"stopping the previous {model} server", 2, 3)
    if old_backend and old_backend.get("pid") != backend["pid"]:
        _drain(cfg, host, port, old_backend.get("port", -1), timeout=max(60.0, s.startup_timeout_s))
        proc.stop(old_backend)
    if old_proxy:
        proc.stop(old_proxy)
    if progress:
        progress(f"{model} {version} serving", 3, 3)
    return {"action": "switched" if replacing else "started", "url": url, "port": port, "pid": backend["pid"],
            "backend": s.backend,
            "backend_port": backend["port"], "proxy_pid": proxy["pid"], "ready_s": backend["ready_s"],
            "switch_s": round(gap, 4), "cpu_mode": started.mode.describe()}


def model_state(cfg: "Config", model: str, entry: dict | None = None) -> tuple[str, str]:
    """(state, why): running | unreachable | dead | stopped | not deployed."""
    entry = entry if entry is not None else registry_entry(cfg, model)
    if not entry or not entry.get("gguf"):
        return "not deployed", "no server recorded for this model"
    if entry.get("state") == "stopped":
        return "stopped", "stopped by loradeploy serve stop"
    proxy_ok, backend_ok = proc.alive(entry.get("proxy")), proc.alive(entry.get("backend"))
    if not proxy_ok or not backend_ok:
        gone = [n for n, ok in (("proxy", proxy_ok), ("server", backend_ok)) if not ok]
        why = f"{' and '.join(gone)} process gone"
        if not backend_ok and entry.get("backend"):
            how = ended_how(entry["backend"])
            if how:
                why += f" (server {how} in CPU mode {entry['backend'].get('cpu_mode', '?')})"
            why += f"; last log lines: {last_lines(Path(entry.get('log') or server_log_path(cfg, model)), 0)}"
        return "dead", why
    sha = serving_sha(cfg, entry)
    if sha is None:
        return "unreachable", f"port {entry.get('port')} does not answer"
    if sha != entry.get("sha256"):
        return "unreachable", f"port {entry.get('port')} serves sha256 {sha[:12]}, not the recorded one"
    return "running", "serving the recorded GGUF"
