"""Merged mode (serving.strategy): a model's public port, a front proxy forwarding to the model's own
backend of the live version.

A new version starts on a spare port (launch.start_backend) and must pass the readiness probe;
only then does the proxy route new requests to it (SIGHUP re-reads its control file); the old
backend stops once its requests in flight are done. A switch never refuses or cuts a request, and a
backend that fails its probe leaves the old one serving.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Optional

from ..paths import servers_dir as run_dir, server_log_path
from ..tools import proc
from . import record
from .backends import read_key
from .control import Control
from .launch import settings_hash, start_backend
from .proxying import check_live_port, current_control, point_proxy, refresh_proxy, retire, serving_sha
from .record import ProcessRecord, ServedModel
from .strategy import Offer, Progress, leave_previous

if TYPE_CHECKING:
    from ..config import Config


def _unchanged(cfg: "Config", model: str, m: Optional[ServedModel], offer: Offer) -> bool:
    """The port serves ``offer`` already, from a live backend locked with the key its proxy holds."""
    if m is None or m.mode != "merged" or not proc.alive(m.backend):
        return False
    ctl, key = current_control(cfg, model), read_key(m.backend.key_file)
    return (key is not None and ctl is not None and ctl.backend_key == key and m.sha256 == offer.sha256
            and m.settings_hash == settings_hash(cfg, model) and m.version == offer.version
            and serving_sha(cfg, m) == offer.sha256)


class MergedStrategy:
    mode = "merged"

    def switch(self, cfg: "Config", model: str, offer: Offer, progress: Optional[Progress] = None) -> dict:
        s = cfg.deployment.llamacpp
        host, port = s.host, cfg.models[model].port
        reg = record.load(cfg)
        m = reg.models.get(model)
        ours = check_live_port(cfg, model, m)
        log_path = server_log_path(cfg, model)
        reloaded = ours and refresh_proxy(cfg, model, m.proxy, log_path)  # a changed key or limits, first
        old_backend = m.backend if m is not None else None
        if ours and _unchanged(cfg, model, m, offer):
            return {"action": "reconfigured" if reloaded else "unchanged", "url": m.url, "port": port,
                    "pid": old_backend.pid, "backend_port": old_backend.port,
                    "cpu_mode": old_backend.cpu_mode.describe if old_backend.cpu_mode else None}
        replacing = proc.alive(reg.backend_of(m))
        if progress:
            progress(f"starting {model} {offer.version} on a spare port", 0, 3)
        started = start_backend(cfg, model, offer.gguf, log_path=log_path, conf_dir=run_dir(cfg, model),
                                taken=reg.backend_ports(), version=offer.version, fmt=offer.format,
                                sha256=offer.sha256)
        backend = started.record
        with record.update(cfg) as r:  # known before the switch: a loradeploy killed mid-switch leaves none unknown
            r.pending[model] = backend
        if progress:
            progress(f"switching port {port} to {offer.version}", 1, 3)
        try:
            # What the proxy answers for every kind of backend (/loradeploy/info) and the system prompt it applies.
            pointed = point_proxy(cfg, model, m, ours, Control(
                backend_port=backend.port, version=offer.version, format=offer.format, sha256=offer.sha256,
                gguf=str(offer.gguf), backend=s.backend, mode=self.mode, backend_key=started.key,
                system_prompt=cfg.models[model].system_prompt or ""), log_path)
        except BaseException:
            proc.stop(backend, grace=5)
            with record.update(cfg) as r:
                r.pending.pop(model, None)
            raise
        now = time.time()
        with record.update(cfg) as r:
            r.pending.pop(model, None)
            r.models[model] = ServedModel(
                model=model, mode=self.mode, state="running", version=offer.version, format=offer.format, host=host,
                port=port, gguf=str(offer.gguf), sha256=offer.sha256, settings_hash=settings_hash(cfg, model),
                log=str(log_path), backend_kind=s.backend, proxy=pointed.proxy, backend=backend,
                started_at=m.started_at if ours and m is not None else now, switched_at=now)
        if progress:
            progress(f"stopping the previous {model} server", 2, 3)
        if m is not None and m.mode == self.mode:
            retire(cfg, old_backend, backend.pid, [(host, port)])
        leave_previous(cfg, model, m, self.mode, None, backend.pid, [(host, port)])
        if m is not None and not ours:
            proc.stop(m.proxy)  # a proxy of ours that had lost its port
        if progress:
            progress(f"{model} {offer.version} serving", 3, 3)
        return {"action": "switched" if replacing else "started", "url": r.models[model].url, "port": port,
                "pid": backend.pid, "backend": s.backend, "backend_port": backend.port, "proxy_pid": pointed.proxy.pid,
                "ready_s": backend.ready_s, "switch_s": round(pointed.gap_s, 4), "cpu_mode": started.mode.describe()}

    def stop(self, cfg: "Config", model: str, m: ServedModel) -> dict:
        for rec in (m.proxy, m.backend, record.load(cfg).pending.get(model)):
            proc.stop(rec)
        with record.update(cfg) as r:
            r.pending.pop(model, None)
            if model in r.models:
                r.models[model] = dataclasses.replace(r.models[model], state="stopped", stopped_at=time.time())
        return {}

    def release(self, cfg: "Config", model: str, m: ServedModel, keep_pid: int, ports: list[tuple[str, int]]) -> None:
        backend: Optional[ProcessRecord] = m.backend
        retire(cfg, backend, keep_pid, ports)
