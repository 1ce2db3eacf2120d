"""A model's public port: a front proxy that forwards to the backend of the live version.

A new version starts on a spare port (launch.start_backend) and must pass the readiness probe;
only then does the proxy route new requests to it (SIGHUP re-reads its control file); the old
backend stops once its requests in flight are done. A switch never refuses or cuts a request, and a
backend that fails its probe leaves the old one serving.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..paths import servers_dir as run_dir, server_log_path
from ..tools import proc
from .launch import last_lines, settings_hash, start_backend
from .ports import client_host
from .backends import read_key
from .control import Control
from .proxying import check_live_port, current_control, point_proxy, refresh_proxy, retire, serving_sha
from .registry import ended_how, read_registry, registry_entry, update_entry
from .shared import release_member

if TYPE_CHECKING:
    from ..config import Config


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
    log_path = server_log_path(cfg, model)
    reloaded = ours and refresh_proxy(cfg, model, entry["proxy"], log_path)  # a changed key or limits, first
    ctl, old_key = current_control(cfg, model), read_key((old_backend or {}).get("key_file"))
    locked = old_key is not None and ctl is not None and ctl.backend_key == old_key  # else: restart it locked
    if (ours and locked and proc.alive(old_backend) and entry.get("sha256") == sha256
            and entry.get("settings_hash") == shash and entry.get("version") == version and not entry.get("group")
            and serving_sha(cfg, entry) == sha256):
        return {"action": "reconfigured" if reloaded else "unchanged", "url": url, "port": port,
                "pid": old_backend["pid"], "backend_port": old_backend["port"], "cpu_mode": old_backend.get("cpu_mode")}
    replacing = proc.alive(old_backend)
    if progress:
        progress(f"starting {model} {version} on a spare port", 0, 3)
    taken = {e.get("backend", {}).get("port") for e in read_registry(cfg)["models"].values()} - {None}
    started = start_backend(cfg, model, gguf, log_path=log_path, conf_dir=run_dir(cfg, model), taken=taken,
                            version=version, fmt=fmt, sha256=sha256)
    backend = started.record
    # Recorded before the switch, so a loradeploy killed mid-switch leaves no unknown server behind.
    update_entry(cfg, model, pending_backend=backend)
    if progress:
        progress(f"switching port {port} to {version}", 1, 3)
    try:
        # Everything the proxy answers for every kind of backend: what is served (/loradeploy/info)
        # and the model's system prompt, applied to chat requests on their way through.
        pointed = point_proxy(cfg, model, entry, ours, Control(
            backend_port=backend["port"], version=version, format=fmt, sha256=sha256, gguf=str(gguf),
            backend=s.backend, mode="merged", backend_key=started.key,
            system_prompt=cfg.models[model].system_prompt or ""), log_path)
    except BaseException:
        proc.stop(backend, grace=5)
        update_entry(cfg, model, pending_backend=None)
        raise
    proxy = pointed.proxy
    old_proxy = (entry or {}).get("proxy") if not ours else None
    update_entry(cfg, model, version=version, format=fmt, host=host, port=port, gguf=str(gguf), sha256=sha256,
                 settings_hash=shash, proxy=proxy, backend=backend, pending_backend=None, state="running",
                 url=url, log=str(log_path), switched_at=time.time(), cpu_mode=started.mode.as_dict(),
                 backend_kind=s.backend, mode="merged", group=None, lora_id=None,
                 started_at=entry.get("started_at") if ours and entry else time.time())
    if progress:
        progress(f"stopping the previous {model} server", 2, 3)
    if entry and entry.get("group"):
        release_member(cfg, model, entry["group"])
    else:
        retire(cfg, old_backend, backend["pid"], [(host, port)])
    if old_proxy:
        proc.stop(old_proxy)
    if progress:
        progress(f"{model} {version} serving", 3, 3)
    return {"action": "switched" if replacing else "started", "url": url, "port": port, "pid": backend["pid"],
            "backend": s.backend,
            "backend_port": backend["port"], "proxy_pid": proxy["pid"], "ready_s": backend["ready_s"],
            "switch_s": round(pointed.gap_s, 4), "cpu_mode": started.mode.describe()}


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
