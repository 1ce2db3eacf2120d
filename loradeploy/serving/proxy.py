"""The front proxy worker (``python -m loradeploy.serving.worker proxy PROXY.json``): owns a model's public
port and forwards each request to the backend its control file names, so a new version is swapped in
between requests and no client sees a refused or cut connection.

Its two files are typed records (``control``): ``ProxyConf`` (proxy.json: where it listens, the sha256 of
the clients' api key, its limits) and ``Control`` (control.json: what the port serves, the backend's port
and that backend's own key). SIGHUP re-reads both, so a changed key or limit reaches a running port; a
file that fails its schema is logged and the state it would replace is kept. ``/loradeploy/proxy``
reports the sha256 of the exact bytes of each file last loaded (the switch waits for them).

What each request may do is ``policy.route``'s; h11 frames requests and answers (``front``), the backend
side is ``forward``'s, and ``/metrics`` is the port's own (``metrics``)."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from .control import Control, ControlError, Limits, ProxyConf, load_hashed as _read
from .front import Conn, over_capacity
from .metrics import Metrics
from .policy import PortInfo

INFO_KEYS = ("version", "format", "sha256", "gguf", "backend", "backend_port", "switched_at", "mode", "base_gguf",
             "base_sha256", "lora")
STOP_GRACE_S = 30.0


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {msg}", file=sys.stderr, flush=True)


class Proxy:
    """What one port's proxy knows: its files as last loaded, and its counters."""

    def __init__(self, conf_path: Path | str):
        self.conf_path = Path(conf_path)
        self.conf, conf_sha = _read(ProxyConf, self.conf_path)
        self.control: Optional[Control] = None
        self.metrics = Metrics()
        self.connections = 0
        self.requests_in_flight = 0
        self.inflight: dict[str, int] = {}
        self.status = {"backend_port": None, "version": None, "inflight": self.inflight, "served": 0,
                       "refused": 0, "pid": os.getpid(), "conf_sha256": conf_sha, "control_sha256": None,
                       "event_loop": None}
        self.port_info = PortInfo()
        self.reload_control()

    log = staticmethod(_log)

    @property
    def limits(self) -> Limits:
        return self.conf.limits

    @property
    def backend_port(self) -> Optional[int]:
        return self.control.backend_port if self.control else None

    def reload(self) -> None:
        """SIGHUP: both files again."""
        try:
            conf, sha = _read(ProxyConf, self.conf_path)
        except ControlError as exc:
            _log(f"proxy: {exc}; keeping the conf loaded before")
        else:
            if (conf.host, conf.port) != (self.conf.host, self.conf.port):
                _log(f"proxy: a new address {conf.host}:{conf.port} takes a restart; still on "
                     f"{self.conf.host}:{self.conf.port}")
            self.conf = conf
            self.status["conf_sha256"] = sha
        self.reload_control()

    def reload_control(self) -> None:
        try:
            control, sha = _read(Control, self.conf.control)
        except ControlError as exc:
            _log(f"proxy: {exc}; keeping backend {self.backend_port}")
            self._derive()
            return
        if control.backend_port != self.backend_port:
            _log(f"proxy: backend {self.backend_port} -> {control.backend_port} (version {control.version})")
        self.control = control
        self.status.update(backend_port=control.backend_port, version=control.version, control_sha256=sha)
        self._derive()

    def _derive(self) -> None:
        c, conf = self.control, self.conf
        info = {"alias": conf.alias, **{k: getattr(c, k, None) for k in INFO_KEYS},
                "system_prompt": bool(c and c.system_prompt), "proxy_pid": os.getpid()}
        self.port_info = PortInfo(
            alias=conf.alias, system_prompt=c.system_prompt if c else "", lora=c.lora if c else None,
            created=int(c.switched_at) if c else 0, embeddings=bool(c and c.embeddings),
            max_body=conf.limits.max_body, stream_cancel=bool(c and c.backend == "llama-server"),
            info=info, proxy=self.status)

    def authorized(self, header: Optional[bytes]) -> bool:
        want = self.conf.api_key_sha256
        if not want:
            return True
        scheme, _, token = (header or b"").partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        return hmac.compare_digest(hashlib.sha256(token).hexdigest(), want)

    def metrics_text(self) -> str:
        c = self.control
        served = {k: getattr(c, k, None) for k in ("version", "format", "sha256", "mode")}
        return self.metrics.render(self.requests_in_flight, served)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limit = self.conf.limits.max_connections
        if self.connections >= limit:
            await over_capacity(writer, limit)
            return
        self.connections += 1
        try:
            await Conn(self, reader, writer).run()
        finally:
            self.connections -= 1


async def _serve(proxy: Proxy) -> None:
    conf = proxy.conf
    loop = asyncio.get_running_loop()
    proxy.status["event_loop"] = type(loop).__module__.split(".")[0]  # "uvloop" or "asyncio"
    loop.add_signal_handler(signal.SIGHUP, proxy.reload)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = await asyncio.start_server(proxy.handle, conf.host, conf.port, reuse_address=True, backlog=1024)
    _log(f"proxy for {conf.alias} listening on {conf.host}:{conf.port} -> backend {proxy.backend_port}")
    async with server:
        await stop.wait()
        server.close()
        # requests in flight finish (bounded) before the process exits
        end = time.monotonic() + STOP_GRACE_S
        while proxy.inflight and time.monotonic() < end:
            await asyncio.sleep(0.05)
    _log("proxy stopped")


def loop_factory() -> Optional[Callable[[], asyncio.AbstractEventLoop]]:
    """uvloop's event loop (libuv: about half the CPU per relayed event of asyncio's own, measured in
    bench/frontdoor.py) where it is installed, else asyncio's; ``LORADEPLOY_EVENT_LOOP=asyncio`` forces
    asyncio's (tests run the proxy both ways)."""
    if os.environ.get("LORADEPLOY_EVENT_LOOP", "auto") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop
    return None


def run_proxy(conf_path: Path | str) -> int:
    try:
        proxy = Proxy(conf_path)
    except ControlError as exc:
        _log(f"proxy cannot start: {exc}")
        return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(_serve(proxy))
    except OSError as exc:
        _log(f"proxy cannot listen on {proxy.conf.host}:{proxy.conf.port}: {exc}")
        return 3
    return 0
