"""Embedded llama.cpp servers: one front proxy per model on its port, a backend per version.

A model's public port belongs to a small proxy process; the model itself runs in a backend process
on a loopback spare port. A new version starts on another spare port, must pass the readiness probe
(``/v1/models`` lists the model and one chat completion succeeds), and only then does the proxy
route new requests to it; the old backend is stopped once its requests in flight are done. So a
switch never refuses or cuts a request, and a backend that fails its probe leaves the old one
serving. Both processes are detached (own session) and outlive loradeploy; a registry
(state_dir/servers.json, written atomically under a lock) remembers them, and status reconciles it
with reality (pid alive and the same process? port answering? serving the recorded sha256?).

This module is also the library API the CLI calls: deploy_model, rollback, serve_start, serve_stop,
serve_status, serve_logs, endpoints.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

from .errors import DeployError, InputError, ResourceError
from .fsutil import atomic_write_text

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("loradeploy.serve")
log.addHandler(logging.NullHandler())  # a library: messages go to the CLI's handlers or nowhere
REGISTRY_VERSION = 1
_CHILDREN: dict[int, subprocess.Popen] = {}  # reaped here so a dead child never lingers as a zombie


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


# ----------------------------------------------------------------------------- registry

def registry_path(cfg: "Config") -> Path:
    return Path(cfg.pipeline.state_dir) / "servers.json"


def _read_registry(cfg: "Config") -> dict:
    path = registry_path(cfg)
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            return data
        log.warning("server registry %s has no models mapping; starting a new one", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("server registry %s is unreadable (%s); starting a new one", path, exc)
    return {"version": REGISTRY_VERSION, "models": {}}


@contextlib.contextmanager
def _registry(cfg: "Config") -> Iterator[dict]:
    """Read-modify-write the registry under an exclusive lock; written only if the block succeeds."""
    path = registry_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name("servers.lock"), "a+") as lk:
        fcntl.flock(lk.fileno(), fcntl.LOCK_EX)
        try:
            data = _read_registry(cfg)
            yield data
            data["updated_at"] = time.time()
            atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))
        finally:
            fcntl.flock(lk.fileno(), fcntl.LOCK_UN)


def registry_entry(cfg: "Config", model: str) -> dict | None:
    return _read_registry(cfg)["models"].get(model)


def _update_entry(cfg: "Config", model: str, **changes: Any) -> dict:
    with _registry(cfg) as reg:
        entry = reg["models"].setdefault(model, {"model": model})
        entry.update(changes)
        return dict(entry)


# ----------------------------------------------------------------------------- processes

def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None:
        child.poll()  # collects the exit status of our own exited child (no zombie), keeps its returncode


def exit_signal(rec: dict) -> Optional[int]:
    """The signal that killed a worker this process started, if that is how it ended."""
    child = _CHILDREN.get(int(rec.get("pid") or 0))
    if child is None or child.poll() is None or child.returncode >= 0:
        return None
    return -child.returncode


def proc_alive(rec: dict | None) -> bool:
    """True when the recorded process exists, is the same process (start time), and is no zombie."""
    import psutil

    if not rec or not rec.get("pid"):
        return False
    pid = int(rec["pid"])
    _reap(pid)
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - float(rec.get("create_time", 0))) > 1.0:
            return False  # the pid was reused by another process
        return p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _spawn(kind: str, conf: dict, conf_path: Path, log_path: Path) -> dict:
    import psutil

    atomic_write_text(conf_path, json.dumps(conf, indent=2))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG_FILE", "MODEL", "API_KEY")}
    # The worker must import this package even when loradeploy is run from a checkout.
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, *filter(None, [env.get("PYTHONPATH")])])
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "loradeploy.tools.serve_worker", kind, str(conf_path)],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                cwd=str(conf_path.parent), start_new_session=True, close_fds=True)
    _CHILDREN[proc.pid] = proc
    try:
        ctime = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        ctime = 0.0
    return {"pid": proc.pid, "create_time": ctime, "config": str(conf_path)}


def stop_process(rec: dict | None, grace: float = 30.0) -> None:
    """SIGTERM the worker's process group (it finishes requests in flight), SIGKILL after ``grace``."""
    if not proc_alive(rec):
        return
    pid = int(rec["pid"])
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and proc_alive(rec):
        time.sleep(0.05)
    if proc_alive(rec):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        end = time.monotonic() + 5
        while time.monotonic() < end and proc_alive(rec):
            time.sleep(0.05)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1)


# ----------------------------------------------------------------------------- ports and HTTP

def port_holder(host: str, port: int) -> Optional[str]:
    """None when ``port`` can be bound on ``host``; else a description of who holds it."""
    import psutil

    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return None
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                return f"unusable ({exc.strerror})"
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                try:
                    name = psutil.Process(c.pid).name()
                except psutil.Error:
                    name = "?"
                return f"held by pid {c.pid} ({name})"
    except psutil.Error:
        pass
    return "held by another process (pid not visible to this user)"


def _pick_spare(cfg: "Config", taken: set[int]) -> int:
    lo, hi = cfg.deployment.llamacpp.spare_port_range
    ports = list(range(lo, hi + 1))
    start = random.randrange(len(ports))
    for port in ports[start:] + ports[:start]:
        if port not in taken and port_holder("127.0.0.1", port) is None:
            return port
    raise ResourceError(f"no free port in deployment.llamacpp.spare_port_range {lo}-{hi}",
                        hint="widen the range or stop what holds those ports")


def http_json(method: str, url_host: str, port: int, path: str, body: Any = None,
              timeout: float = 5.0) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(url_host, port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _log_tail(path: Path, lines: int = 50) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _reason(log_path: Path, since: int) -> str:
    """The most telling line a failed worker wrote after byte offset ``since``."""
    try:
        with open(log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return "no log"
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for key in ("error loading model", "Error", "error", "failed", "Failed", "Traceback"):
        hits = [l for l in lines if key in l and not l.startswith("File ")]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else "no output"


# ----------------------------------------------------------------------------- backends

def server_log_path(cfg: "Config", model: str) -> Path:
    return Path(cfg.logging.log_dir) / model / "server.log"


def _run_dir(cfg: "Config", model: str) -> Path:
    return Path(cfg.pipeline.state_dir) / "servers" / model


def _threads(cfg: "Config") -> int:
    from .resources import cpu_budget

    return cfg.deployment.llamacpp.threads or cpu_budget(cfg.performance.max_cpu_threads)


def _extra_model_settings(args: Sequence[str]) -> dict:
    """deployment.llamacpp.extra_args as llama-cpp-python ModelSettings fields (--name value)."""
    from llama_cpp.server.settings import ModelSettings

    out: dict[str, Any] = {}
    items = list(args)
    i = 0
    while i < len(items):
        key = items[i]
        if not key.startswith("--"):
            raise DeployError(f"deployment.llamacpp.extra_args: expected --name value, got {key!r}")
        key, eq, val = key[2:].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise DeployError(f"deployment.llamacpp.extra_args: --{key} has no value")
            val, i = items[i + 1], i + 1
        key = key.replace("-", "_")
        if key not in ModelSettings.model_fields:
            raise DeployError(f"deployment.llamacpp.extra_args: unknown llama.cpp server setting --{key}",
                              hint="use a llama_cpp.server ModelSettings field, e.g. --flash_attn true")
        out[key] = val
        i += 1
    return out


def settings_hash(cfg: "Config", model: str) -> str:
    s = cfg.deployment.llamacpp
    blob = json.dumps([cfg.models[model].system_prompt, s.n_ctx, _threads(cfg), s.n_gpu_layers, s.n_batch,
                       list(s.extra_args)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _wait_ready(model: str, port: int, proc_rec: dict, log_path: Path, log_from: int, timeout: float) -> None:
    """Ready = /v1/models lists the model and one chat completion succeeds, within ``timeout``."""
    end = time.monotonic() + timeout
    listed = False
    last = "no answer yet"
    while time.monotonic() < end:
        if not proc_alive(proc_rec):
            sig = exit_signal(proc_rec)
            how = f"killed by {signal.Signals(sig).name}" if sig else _reason(log_path, log_from)
            raise DeployError(f"llama.cpp server for {model} exited during startup: {how}", hint=f"see {log_path}")
        try:
            if not listed:
                code, data = http_json("GET", "127.0.0.1", port, "/v1/models", timeout=5)
                ids = [m.get("id") for m in (data or {}).get("data", [])] if code == 200 and isinstance(data, dict) else []
                listed = model in ids
                last = f"/v1/models answered {code} listing {ids}"
            if listed:
                left = max(5.0, end - time.monotonic())
                code, data = http_json("POST", "127.0.0.1", port, "/v1/chat/completions",
                                       {"model": model, "max_tokens": 1, "temperature": 0,
                                        "messages": [{"role": "user", "content": "ping"}]}, timeout=left)
                if code == 200 and isinstance(data, dict) and data.get("choices"):
                    return
                last = f"probe completion answered {code}: {str(data)[:200]}"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    raise DeployError(f"llama.cpp server for {model} was not ready within {timeout:.0f}s ({last})",
                      hint=f"raise deployment.llamacpp.startup_timeout_s or see {log_path}")


def _quirks_path(cfg: "Config") -> Path:
    return Path(cfg.pipeline.state_dir) / "servers" / "cpu_quirks.json"


def _quirks(cfg: "Config") -> dict:
    try:
        return json.loads(_quirks_path(cfg).read_text())
    except (OSError, ValueError):
        return {}


def _start_backend(cfg: "Config", model: str, *, gguf: Path, version: str, fmt: str, sha256: str,
                   taken: set[int]) -> dict:
    s = cfg.deployment.llamacpp
    log_path = server_log_path(cfg, model)
    extra = _extra_model_settings(s.extra_args)
    extra_bufts = _quirks(cfg).get("extra_bufts")
    # Retries: a spare port grabbed between our check and the bind; a CPU that advertises AMX but
    # faults on it (seen in VMs): llama.cpp's repacked/AMX weight buffers are then switched off.
    for attempt in (1, 2, 3):
        port = _pick_spare(cfg, taken)
        conf = {"alias": model, "version": version, "format": fmt, "sha256": sha256, "gguf": str(gguf),
                "host": "127.0.0.1", "port": port, "n_ctx": s.n_ctx, "threads": _threads(cfg),
                "n_gpu_layers": s.n_gpu_layers, "n_batch": s.n_batch, "model_extra": extra,
                "system_prompt": cfg.models[model].system_prompt, "extra_bufts": extra_bufts}
        log_from = log_path.stat().st_size if log_path.exists() else 0
        t0 = time.monotonic()
        rec = _spawn("backend", conf, _run_dir(cfg, model) / f"backend-{port}.json", log_path)
        rec.update(port=port, version=version, started_at=time.time())
        try:
            _wait_ready(model, port, rec, log_path, log_from, s.startup_timeout_s)
        except DeployError as exc:
            sig = exit_signal(rec)
            stop_process(rec, grace=5)
            if attempt < 3 and sig == signal.SIGILL and extra_bufts is not False:
                extra_bufts = False
                atomic_write_text(_quirks_path(cfg), json.dumps(
                    {"extra_bufts": False, "why": "llama.cpp died with SIGILL using its extra (AMX/repacked) "
                                                  "weight buffers on this CPU", "at": time.time()}))
                log.warning("%s: llama.cpp crashed with SIGILL; retrying without extra weight buffer types", model)
                continue
            if attempt < 3 and "address already in use" in _log_tail(log_path, 20).lower():
                taken.add(port)
                continue
            raise exc
        rec["ready_s"] = round(time.monotonic() - t0, 3)
        return rec
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- proxy and switch

def _proxy_state(host: str, port: int, timeout: float = 2.0) -> dict | None:
    from .tools.serve_worker import PROXY_PATH

    try:
        code, data = http_json("GET", _client_host(host), port, PROXY_PATH, timeout=timeout)
    except (OSError, http.client.HTTPException):
        return None
    return data if code == 200 and isinstance(data, dict) else None


def _wait_proxy(host: str, port: int, backend_port: int, rec: dict, log_path: Path, timeout: float = 15) -> float:
    t0 = time.monotonic()
    end = t0 + timeout
    while time.monotonic() < end:
        st = _proxy_state(host, port, timeout=1)
        if st and st.get("backend_port") == backend_port and st.get("pid") == rec["pid"]:
            return time.monotonic() - t0
        if not proc_alive(rec):
            raise DeployError(f"front proxy on port {port} exited: {_reason(log_path, 0)}", hint=f"see {log_path}")
        time.sleep(0.02)
    raise DeployError(f"front proxy on port {port} did not take backend {backend_port} within {timeout:.0f}s",
                      hint=f"see {log_path}")


def _drain(host: str, port: int, backend_port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = _proxy_state(host, port, timeout=1)
        if st is None or not st.get("inflight", {}).get(str(backend_port)):
            return
        time.sleep(0.05)


def check_live_port(cfg: "Config", model: str, entry: dict | None) -> bool:
    """True when our own proxy already owns the model's port; raise when anyone else holds it."""
    host, port = cfg.deployment.llamacpp.host, cfg.models[model].port
    proxy = (entry or {}).get("proxy")
    if proxy and proc_alive(proxy) and entry.get("port") == port and entry.get("host") == host:
        return True
    holder = port_holder(host, port)
    if holder:
        raise ResourceError(f"port {port} for model {model} is {holder}",
                            hint=f"stop that process or give models.{model}.port another port")
    return False


def switch(cfg: "Config", model: str, *, gguf: Path, version: str, fmt: str, sha256: str,
           progress: Callable[[str, float, float], None] | None = None) -> dict:
    """Serve ``gguf`` on the model's port with no failed request; the caller holds the model lock."""
    s = cfg.deployment.llamacpp
    host, port = s.host, cfg.models[model].port
    shash = settings_hash(cfg, model)
    entry = registry_entry(cfg, model)
    ours = check_live_port(cfg, model, entry)
    old_backend = (entry or {}).get("backend")
    if (ours and proc_alive(old_backend) and entry.get("sha256") == sha256
            and entry.get("settings_hash") == shash and entry.get("version") == version
            and _serving(entry) == sha256):
        return {"action": "unchanged", "url": f"http://{_client_host(host)}:{port}", "port": port,
                "pid": old_backend["pid"], "backend_port": old_backend["port"]}
    replacing = proc_alive(old_backend)
    if progress:
        progress(f"starting {model} {version} on a spare port", 0, 3)
    taken = {e.get("backend", {}).get("port") for e in _read_registry(cfg)["models"].values()} - {None}
    backend = _start_backend(cfg, model, gguf=gguf, version=version, fmt=fmt, sha256=sha256, taken=taken)
    # Recorded before the switch, so a loradeploy killed mid-switch leaves no unknown server behind.
    _update_entry(cfg, model, pending_backend=backend)
    log_path = server_log_path(cfg, model)
    control = _run_dir(cfg, model) / "control.json"
    spawned = None
    try:
        if progress:
            progress(f"switching port {port} to {version}", 1, 3)
        atomic_write_text(control, json.dumps({"backend_port": backend["port"], "version": version}))
        if ours:
            proxy = entry["proxy"]
            t0 = time.monotonic()
            os.kill(int(proxy["pid"]), signal.SIGHUP)
            _wait_proxy(host, port, backend["port"], proxy, log_path)
            gap = time.monotonic() - t0
        else:
            pconf = {"alias": model, "host": host, "port": port, "control": str(control)}
            proxy = spawned = _spawn("proxy", pconf, _run_dir(cfg, model) / "proxy.json", log_path)
            proxy["started_at"] = time.time()
            gap = _wait_proxy(host, port, backend["port"], proxy, log_path)
    except BaseException:
        if ours and old_backend:  # point the live proxy back at the version that was serving
            atomic_write_text(control, json.dumps({"backend_port": old_backend["port"], "version": entry["version"]}))
            with contextlib.suppress(OSError):
                os.kill(int(entry["proxy"]["pid"]), signal.SIGHUP)
        if spawned:
            stop_process(spawned, grace=5)
        stop_process(backend, grace=5)
        _update_entry(cfg, model, pending_backend=None)
        raise
    old_proxy = (entry or {}).get("proxy") if not ours else None
    _update_entry(cfg, model, version=version, format=fmt, host=host, port=port, gguf=str(gguf), sha256=sha256,
                  settings_hash=shash, proxy=proxy, backend=backend, pending_backend=None, state="running",
                  url=f"http://{_client_host(host)}:{port}", log=str(log_path), switched_at=time.time(),
                  started_at=entry.get("started_at") if ours and entry else time.time())
    if progress:
        progress(f"stopping the previous {model} server", 2, 3)
    if old_backend and old_backend.get("pid") != backend["pid"]:
        _drain(host, port, old_backend.get("port", -1), timeout=max(60.0, s.startup_timeout_s))
        stop_process(old_backend)
    if old_proxy:
        stop_process(old_proxy)
    if progress:
        progress(f"{model} {version} serving", 3, 3)
    return {"action": "switched" if replacing else "started", "url": f"http://{_client_host(host)}:{port}",
            "port": port, "pid": backend["pid"], "backend_port": backend["port"], "proxy_pid": proxy["pid"],
            "ready_s": backend["ready_s"], "switch_s": round(gap, 4)}


def _serving(entry: dict, timeout: float = 3.0) -> Optional[str]:
    """sha256 the model's public port is serving now, asked through the proxy; None if no answer."""
    from .tools.serve_worker import INFO_PATH

    try:
        code, data = http_json("GET", _client_host(entry.get("host", "127.0.0.1")), int(entry["port"]),
                               INFO_PATH, timeout=timeout)
    except (OSError, http.client.HTTPException, KeyError, TypeError, ValueError):
        return None
    return data.get("sha256") if code == 200 and isinstance(data, dict) else None


def model_state(cfg: "Config", model: str, entry: dict | None = None) -> tuple[str, str]:
    """(state, why): running | unreachable | dead | stopped | not deployed."""
    entry = entry if entry is not None else registry_entry(cfg, model)
    if not entry or not entry.get("gguf"):
        return "not deployed", "no server recorded for this model"
    if entry.get("state") == "stopped":
        return "stopped", "stopped by loradeploy serve stop"
    proxy_ok, backend_ok = proc_alive(entry.get("proxy")), proc_alive(entry.get("backend"))
    if not proxy_ok or not backend_ok:
        gone = [n for n, ok in (("proxy", proxy_ok), ("server", backend_ok)) if not ok]
        return "dead", f"{' and '.join(gone)} process gone"
    sha = _serving(entry)
    if sha is None:
        return "unreachable", f"port {entry.get('port')} does not answer"
    if sha != entry.get("sha256"):
        return "unreachable", f"port {entry.get('port')} serves sha256 {sha[:12]}, not the recorded one"
    return "running", "serving the recorded GGUF"


# ----------------------------------------------------------------------------- library API

def _model_names(cfg: "Config", models: Optional[Sequence[str]], *, registered: bool) -> list[str]:
    if models:
        for m in models:
            cfg.model(m)
        return list(models)
    if registered:
        return sorted(_read_registry(cfg)["models"])
    return [n for n, m in cfg.models.items() if m.enabled]


def deploy_model(cfg: "Config", model: str, *, gguf: Path | str | None = None,
                 progress: Callable[[str, float, float], None] | None = None) -> dict:
    """Deploy ``gguf`` (default: the model's served format from its last quantize run) as the model's
    configured version to every target in deployment.targets."""
    from .stages.deploy import deploy_model as _deploy

    return _deploy(cfg, model, gguf=gguf, progress=progress)


def rollback(cfg: "Config", model: str, to_version: str | None = None,
             progress: Callable[[str, float, float], None] | None = None) -> dict:
    """Bring back the previous (or the named) backed-up version and switch the server to it."""
    from .versions import rollback as _rollback

    return _rollback(cfg, model, to_version=to_version, progress=progress)


def serve_start(cfg: "Config", models: Optional[Sequence[str]] = None) -> list[dict]:
    """Start (or leave running) the server of each model's live deployed version."""
    from .state import ModelLock
    from .versions import live_version

    out = []
    for name in _model_names(cfg, models, registered=False):
        with ModelLock(cfg.pipeline.state_dir, name, purpose="serve start"):
            entry = registry_entry(cfg, name)
            live = live_version(cfg, name)
            if live is not None:
                gguf, version, fmt, sha = live.path, live.version, live.format, live.sha256
            elif entry and entry.get("gguf") and Path(entry["gguf"]).is_file():
                gguf, version, fmt, sha = Path(entry["gguf"]), entry["version"], entry["format"], entry["sha256"]
            else:
                raise DeployError(f"model {name} has no deployed version to serve",
                                  hint=f"run `loradeploy run --model {name}` or `loradeploy deploy --model {name}`")
            if entry and entry.get("state") == "stopped":
                _update_entry(cfg, name, state="starting")
            info = switch(cfg, name, gguf=gguf, version=version, fmt=fmt, sha256=sha)
            out.append({"model": name, "version": version, **info})
    return out


def serve_stop(cfg: "Config", models: Optional[Sequence[str]] = None) -> list[dict]:
    """Stop each model's proxy and server; the registry keeps what was served for serve start."""
    from .state import ModelLock

    out = []
    for name in _model_names(cfg, models, registered=True):
        entry = registry_entry(cfg, name)
        if not entry:
            out.append({"model": name, "stopped": False, "note": "no server recorded"})
            continue
        with ModelLock(cfg.pipeline.state_dir, name, purpose="serve stop"):
            was = proc_alive(entry.get("proxy")) or proc_alive(entry.get("backend"))
            stop_process(entry.get("proxy"))
            stop_process(entry.get("backend"))
            stop_process(entry.get("pending_backend"))
            _update_entry(cfg, name, state="stopped", stopped_at=time.time())
            out.append({"model": name, "stopped": was})
    return out


def serve_status(cfg: "Config") -> list[dict]:
    """One row per model (configured or recorded): model, version, format, port, pid, state, url, uptime."""
    reg = _read_registry(cfg)["models"]
    names = sorted(set(reg) | {n for n, m in cfg.models.items() if m.enabled})
    rows = []
    now = time.time()
    for name in names:
        entry = reg.get(name)
        state, why = model_state(cfg, name, entry or {})
        backend = (entry or {}).get("backend") or {}
        running = state == "running"
        rows.append({
            "model": name, "version": (entry or {}).get("version"), "format": (entry or {}).get("format"),
            "port": (entry or {}).get("port", cfg.models[name].port if name in cfg.models else None),
            "pid": backend.get("pid") if running or state == "unreachable" else None,
            "proxy_pid": ((entry or {}).get("proxy") or {}).get("pid") if running else None,
            "backend_port": backend.get("port"), "state": state, "why": why, "url": (entry or {}).get("url"),
            "uptime": round(now - backend["started_at"], 1) if running and backend.get("started_at") else None,
            "sha256": (entry or {}).get("sha256"), "gguf": (entry or {}).get("gguf"),
        })
    return rows


def serve_logs(cfg: "Config", model: str, lines: int = 50) -> str:
    cfg.model(model)
    path = server_log_path(cfg, model)
    if not path.exists():
        raise InputError(f"model {model} has no server log yet ({path})", hint="deploy or start it first")
    return _log_tail(path, lines)


def endpoints(cfg: "Config", models: Optional[Sequence[str]] = None) -> list[Endpoint]:
    """Every deployed model's public endpoint as recorded (alive or not: health decides that)."""
    reg = _read_registry(cfg)["models"]
    out = []
    for name in _model_names(cfg, models, registered=True):
        e = reg.get(name)
        if not e or not e.get("gguf"):
            continue
        backend = e.get("backend") or {}
        pid = int(backend.get("pid") or 0) if e.get("state") != "stopped" else 0
        out.append(Endpoint(name, e["version"], e["format"], e["url"], int(e["port"]), pid, e["gguf"], e["sha256"]))
    return out


def endpoint_dict(ep: Endpoint) -> dict:
    return asdict(ep)
