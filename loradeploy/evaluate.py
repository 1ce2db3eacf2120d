"""Evaluate deployed models and quant formats over their OpenAI-compatible API.

Each target (one model in one format, or the base model without its adapter) gets the samples that
apply to it, over streaming chat completions, with a warm-up, repeats and bounded concurrency.
Targets without a running server are served for the duration of their turn by a temporary
llama.cpp server, one at a time so memory stays bounded. A target that cannot be reached turns into
error rows; the others are still evaluated. Reports are written by :mod:`loradeploy.report`.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence
from urllib.parse import urlparse

from . import metrics
from .config import QUANT_TYPES, Config
from .errors import EvalError, InputError
from .state import load_record

SCHEMA_VERSION = 1
ProgressFn = Callable[[str, float, float], None]

_SAMPLE_KEYS = {"id", "prompt", "messages", "reference", "expected_contains", "tags", "models", "meta"}
_ROLES = {"system", "user", "assistant"}


# ============================================================================= samples

@dataclass(frozen=True)
class Sample:
    id: str
    messages: tuple[dict, ...]
    reference: Optional[str] = None
    expected_contains: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    models: tuple[str, ...] = ()   # empty: every model
    line: int = 0

    def applies_to(self, model: str) -> bool:
        return not self.models or model in self.models

    def to_dict(self) -> dict:
        return {"id": self.id, "messages": list(self.messages), "reference": self.reference,
                "expected_contains": list(self.expected_contains), "tags": list(self.tags),
                "models": list(self.models), "line": self.line}


def _str_list(value: Any, key: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InputError(f"{where}: {key} must be a string or a list of strings")


def _parse_sample(obj: Any, where: str, lineno: int) -> Sample:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _SAMPLE_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}",
                         hint=f"known keys: {', '.join(sorted(_SAMPLE_KEYS))}")
    sid = obj.get("id")
    if isinstance(sid, bool) or not isinstance(sid, (str, int)) or str(sid).strip() == "":
        raise InputError(f"{where}: every sample needs an id (a non-empty string)")
    has_prompt, has_msgs = obj.get("prompt") is not None, obj.get("messages") is not None
    if has_prompt == has_msgs:
        raise InputError(f"{where}: give exactly one of prompt or messages")
    if has_prompt:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise InputError(f"{where}: prompt must be a non-empty string")
        messages: tuple[dict, ...] = ({"role": "user", "content": obj["prompt"]},)
    else:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
        out = []
        for i, m in enumerate(msgs):
            if (not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str)):
                raise InputError(f"{where}: messages[{i}] must be {{\"role\": system|user|assistant, "
                                 f"\"content\": string}}")
            out.append({"role": m["role"], "content": m["content"]})
        messages = tuple(out)
    ref = obj.get("reference")
    if ref is not None and not isinstance(ref, str):
        raise InputError(f"{where}: reference must be a string")
    return Sample(str(sid), messages, ref, _str_list(obj.get("expected_contains"), "expected_contains", where),
                  _str_list(obj.get("tags"), "tags", where), _str_list(obj.get("models"), "models", where),
                  lineno)


def parse_samples(text: str, source: str = "samples") -> list[Sample]:
    """Parse JSONL text: one sample per non-blank line. Errors name ``source:line``."""
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})",
                             hint="each line must be one JSON object") from None
        s = _parse_sample(obj, where, lineno)
        if s.id in seen:
            raise InputError(f"{where}: duplicate sample id {s.id!r} (first on line {seen[s.id]})")
        seen[s.id] = lineno
        samples.append(s)
    if not samples:
        raise InputError(f"{source} has no samples",
                         hint='write one JSON object per line, e.g. {"id": "q1", "prompt": "...", "reference": "..."}')
    return samples


def load_samples(path: Path | str) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"sample file {path} not found", hint="set evaluation.samples or pass --samples FILE")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read sample file {path}: {exc}") from None
    return parse_samples(text, str(path))


# ============================================================================= targets

@dataclass
class EvalTarget:
    """One row of the comparison: a model in one format, served at base_url or from gguf_path."""
    label: str
    model: str
    format: Optional[str] = None
    base_url: Optional[str] = None
    gguf_path: Optional[str] = None
    is_base: bool = False
    pid: Optional[int] = None
    n_ctx: Optional[int] = None
    live: bool = False                 # the deployed, serving version
    sha256: Optional[str] = None
    version: Optional[str] = None
    system_prompt: Optional[str] = None  # added to samples without a system message (as deploy does)

    def to_dict(self) -> dict:
        return asdict(self)


def _base_gguf(record: dict) -> Optional[str]:
    """A base-model GGUF recorded for this model (top level, any stage's info, or an artifact)."""
    cands = [record.get("base_gguf")]
    for rec in (record.get("stages") or {}).values():
        if isinstance(rec, dict):
            cands.append((rec.get("info") or {}).get("base_gguf"))
            cands += [a.get("path") for a in rec.get("artifacts", []) if a.get("kind") == "base_gguf"]
    for c in cands:
        if c and Path(c).is_file():
            return str(c)
    return None


def _format_from_name(path: str) -> Optional[str]:
    m = re.search(r"-([a-z0-9_]+)\.gguf$", Path(path).name, re.I)
    return m.group(1).upper() if m and m.group(1).upper() in QUANT_TYPES else None


def _endpoints(cfg: Config, names: list[str], notes: list[str]) -> list:
    try:
        from .serve import endpoints
    except ImportError:
        notes.append("deployment registry unavailable (loradeploy.serve missing): only quantized files evaluated")
        return []
    return list(endpoints(cfg, names))


def build_targets(cfg: Config, models: Optional[Sequence[str]] = None,
                  formats: Optional[Sequence[str]] = None) -> tuple[list[EvalTarget], list[str]]:
    """Everything deployed plus every other quantized format, and the base model when recorded."""
    names = list(models) if models else [n for n, m in cfg.models.items() if m.enabled]
    for n in names:
        cfg.model(n)
    fmts = [f.strip().upper() for f in formats] if formats else (cfg.evaluation.formats or None)
    notes: list[str] = []
    live_eps = _endpoints(cfg, names, notes)
    n_ctx = cfg.deployment.llamacpp.n_ctx
    targets: list[EvalTarget] = []
    for name in names:
        order = cfg.formats_for(name)
        sp = cfg.models[name].system_prompt or None
        rows: list[EvalTarget] = []
        covered: set[Optional[str]] = set()
        for ep in (e for e in live_eps if e.model == name):
            if fmts and ep.format not in fmts:
                continue
            label = f"{name} {ep.format or 'live'}"
            rows.append(EvalTarget(label, name, ep.format, base_url=ep.base_url,
                                   gguf_path=str(ep.gguf_path) if ep.gguf_path else None, pid=ep.pid, n_ctx=n_ctx,
                                   live=True, sha256=ep.sha256, version=ep.version, system_prompt=sp))
            covered.add(ep.format)
        rec = load_record(cfg.pipeline.state_dir, name)
        for a in (rec["stages"].get("quantize") or {}).get("artifacts", []):
            fmt = a.get("format")
            if a.get("kind") != "gguf" or fmt in covered or (fmts and fmt not in fmts):
                continue
            if not Path(a["path"]).is_file():
                notes.append(f"{name} {fmt}: quantized file {a['path']} is missing; skipped")
                continue
            rows.append(EvalTarget(f"{name} {fmt}", name, fmt, gguf_path=a["path"], n_ctx=n_ctx,
                                   sha256=a.get("sha256"), version=cfg.models[name].version, system_prompt=sp))
            covered.add(fmt)
        if fmts:
            for f in fmts:
                if f not in covered:
                    notes.append(f"{name} {f}: neither deployed nor quantized; skipped")
        rows.sort(key=lambda t: (order.index(t.format) if t.format in order else len(order), t.label))
        if not rows:
            notes.append(f"{name}: nothing deployed or quantized to evaluate")
        if cfg.evaluation.include_base:
            base = _base_gguf(rec)
            if base:
                rows.append(EvalTarget(f"{name} base", name, _format_from_name(base), gguf_path=base,
                                       is_base=True, n_ctx=n_ctx, system_prompt=sp))
            else:
                notes.append(f"{name}: no base-model GGUF recorded, so the base reference row is skipped")
        targets += rows
    return targets, notes


def with_system_prompt(messages: Sequence[dict], prompt: Optional[str]) -> list[dict]:
    """The deployed server's rule: a conversation without a system message gets the model's."""
    msgs = list(messages)
    if prompt and not any(m.get("role") in ("system", "developer") for m in msgs):
        msgs.insert(0, {"role": "system", "content": prompt})
    return msgs


# ============================================================================= HTTP client

@dataclass
class Reply:
    text: str = ""
    error: Optional[str] = None
    latency_s: Optional[float] = None
    ttft_s: Optional[float] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    finish_reason: Optional[str] = None
    gen_tps: Optional[float] = None
    prompt_tps: Optional[float] = None
    decode_s: Optional[float] = None     # first to last streamed token
    tps_source: Optional[str] = None     # "server" (reported timings) or "stream" (chunk arrival)
    interrupted: bool = False


class Api:
    """A tiny OpenAI-compatible client on http.client: streaming, no dependencies."""

    def __init__(self, base_url: str, timeout_s: float):
        u = urlparse(base_url if "://" in base_url else f"http://{base_url}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise InputError(f"bad server URL {base_url!r}", hint="use http://host:port")
        self.base_url, self.scheme, self.host = base_url, u.scheme, u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.prefix = re.sub(r"/v1/?$", "", u.path.rstrip("/"))
        self.timeout_s = timeout_s
        self.model_id: Optional[str] = None
        self._tokenize: Optional[str] = None   # which tokenize route works, "" when none does

    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def _json(self, method: str, path: str, body: Optional[dict] = None, timeout: Optional[float] = None
              ) -> tuple[int, Any]:
        conn = self._conn(timeout or self.timeout_s)
        try:
            conn.request(method, self.prefix + path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw or b"null")
        except ValueError:
            return resp.status, raw.decode("utf-8", "replace")

    def probe(self, timeout: float = 10.0) -> None:
        """Raise EvalError unless /v1/models answers; remember the served model id."""
        try:
            status, data = self._json("GET", "/v1/models", timeout=timeout)
        except (OSError, http.client.HTTPException) as exc:
            raise EvalError(f"server {self.base_url} is unreachable: {_exc_text(exc)}") from None
        if status != 200:
            raise EvalError(f"server {self.base_url} answered HTTP {status} to /v1/models")
        items = data.get("data") if isinstance(data, dict) else None
        if items and isinstance(items[0], dict):
            self.model_id = items[0].get("id")

    def count_tokens(self, text: str) -> Optional[int]:
        """Token count from the server's tokenizer (llama-cpp-python or llama.cpp), None if neither."""
        routes = [self._tokenize] if self._tokenize else ["/extras/tokenize/count", "/tokenize"]
        if self._tokenize == "":
            return None
        for route in routes:
            body = {"input": text} if route.startswith("/extras") else {"content": text}
            if self.model_id:
                body["model"] = self.model_id
            try:
                status, data = self._json("POST", route, body)
            except (OSError, http.client.HTTPException):
                return None
            if status == 200 and isinstance(data, dict):
                n = data.get("count", len(data.get("tokens") or []) if "tokens" in data else None)
                if isinstance(n, int):
                    self._tokenize = route
                    return n
        self._tokenize = ""
        return None

    def diagnose(self, messages: Sequence[dict], *, max_tokens: int, temperature: float) -> Optional[str]:
        """The server's own error for a request whose stream broke off, if it gives one unstreamed.

        llama-cpp-python drops a streaming connection on a prompt longer than the context, but
        answers the same request unstreamed with an HTTP 400 that says so.
        """
        body: dict[str, Any] = {"messages": list(messages), "max_tokens": max_tokens, "temperature": temperature}
        if self.model_id:
            body["model"] = self.model_id
        try:
            status, data = self._json("POST", "/v1/chat/completions", body)
        except (OSError, http.client.HTTPException):
            return None
        return f"HTTP {status}: {_error_text(data)}" if status >= 400 else None

    def chat(self, messages: Sequence[dict], *, max_tokens: int, temperature: float) -> Reply:
        body: dict[str, Any] = {"messages": list(messages), "max_tokens": max_tokens,
                                "temperature": temperature, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.model_id:
            body["model"] = self.model_id
        t0 = time.perf_counter()
        deadline = t0 + self.timeout_s
        r = Reply()
        conn = self._conn(self.timeout_s)
        first = last = None
        chunks = 0
        done = False
        timings: dict = {}
        try:
            conn.request("POST", self.prefix + "/v1/chat/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
            resp = conn.getresponse()
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {_error_text(resp.read())}"
                r.latency_s = time.perf_counter() - t0
                return r
            parts: list[str] = []
            while True:
                if time.perf_counter() > deadline:
                    r.error = f"timed out after {self.timeout_s:g}s (evaluation.timeout_s)"
                    break
                raw = resp.readline()
                if not raw:
                    break
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                try:
                    ev = json.loads(payload)
                except ValueError:
                    continue
                if not isinstance(ev, dict):
                    continue
                if "error" in ev:
                    r.error = f"server error: {_error_text(ev['error'])}"
                    break
                if ev.get("usage"):
                    r.prompt_tokens = ev["usage"].get("prompt_tokens", r.prompt_tokens)
                    r.completion_tokens = ev["usage"].get("completion_tokens", r.completion_tokens)
                if isinstance(ev.get("timings"), dict):
                    timings = ev["timings"]
                for ch in ev.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content") or (ch.get("text") or "")
                    if piece:
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        chunks += 1
                        parts.append(piece)
                    if ch.get("finish_reason"):
                        r.finish_reason = ch["finish_reason"]
            r.text = "".join(parts)
        except (OSError, http.client.HTTPException) as exc:
            r.error = f"request failed: {_exc_text(exc)}"
        finally:
            conn.close()
        end = time.perf_counter()
        r.latency_s = end - t0
        r.ttft_s = first - t0 if first else None
        if r.error is None and not done and r.finish_reason is None:
            r.error = "the stream ended before the answer was complete (server closed the connection)"
        elif r.error is None and r.finish_reason is None:
            # llama-cpp-python ends a stream early, without a finish reason, when another request
            # arrives (interrupt_requests); the caller retries it alone.
            r.interrupted = True
        if r.completion_tokens is None and chunks:
            r.completion_tokens = chunks   # llama.cpp servers stream one token per chunk
        if first and last:
            r.decode_s = last - first
        if timings.get("predicted_per_second"):
            r.gen_tps, r.tps_source = float(timings["predicted_per_second"]), "server"
        elif r.completion_tokens and r.completion_tokens > 1 and r.decode_s:
            r.gen_tps, r.tps_source = (r.completion_tokens - 1) / r.decode_s, "stream"
        if timings.get("prompt_per_second"):
            r.prompt_tps = float(timings["prompt_per_second"])
            r.prompt_tokens = r.prompt_tokens or timings.get("prompt_n")
        return r


def _exc_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]


def _error_text(body: Any) -> str:
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(body)
        except ValueError:
            body = body.decode("utf-8", "replace")
    if isinstance(body, dict):
        inner = body.get("error", body.get("detail", body.get("message", body)))
        if isinstance(inner, dict):
            inner = inner.get("message", inner)
        body = inner
    return " ".join(str(body).split())[:300]


# ============================================================================= temporary server

def free_port(lo: int = 20000, hi: int = 20999) -> int:
    """A port nothing listens on: from the spare range when one is free, else any."""
    ports = list(range(lo, hi + 1))
    random.shuffle(ports)
    for port in ports[:200] + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise EvalError("no free TCP port on 127.0.0.1")


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in lines[-n:] if line.strip())[-600:]


# Runs llama-cpp-python's server with llama.cpp's extra weight buffer types (AMX, repacking) off.
# Some VMs advertise AMX but trap its instructions (SIGILL on the first completion); this keeps
# such a machine usable at some speed cost, and is used only after a crash like that.

SAFE_MODE_NOTE = ("llama.cpp died of an illegal instruction (a CPU feature this machine advertises but does not "
                  "allow, e.g. AMX); temporary servers run without llama.cpp's extra weight buffers")
_SAFE_MODE = {"on": False}   # set once a server died of SIGILL in this process


def _known_quirk(cfg: Config) -> bool:
    """Whether deploy already found this CPU faulting on llama.cpp's extra buffers (serve.py's record)."""
    try:
        data = json.loads((Path(cfg.pipeline.state_dir) / "servers" / "cpu_quirks.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("extra_bufts") is False


@dataclass
class TempServer:
    url: str
    pid: int
    proc: subprocess.Popen
    safe_mode: bool


def _spawn_server(cfg: Config, gguf: Path, alias: str, log_path: Path, safe: bool) -> tuple[subprocess.Popen, str]:
    from .resources import cpu_budget

    lc = cfg.deployment.llamacpp
    port = free_port(*lc.spare_port_range)
    threads = lc.threads or cpu_budget(cfg.performance.max_cpu_threads)
    launch = ["-m", "loradeploy.tools.llama_safe"] if safe else ["-m", "llama_cpp.server"]
    args = [sys.executable, *launch, "--model", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "--model_alias", alias, "--n_ctx", str(lc.n_ctx),
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_batch", str(lc.n_batch),
            "--n_gpu_layers", str(lc.n_gpu_layers),
            # queued requests must wait, not cut the streaming one short
            "--interrupt_requests", "False", *lc.extra_args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log_f:
        log_f.write(f"$ {' '.join(args)}\n")
        log_f.flush()
        # A long-lived child, so not tools.proc.run (which waits); it still gets its own session
        # so kill_group stops it with any children.
        proc = subprocess.Popen(args, stdout=log_f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(proc: subprocess.Popen, url: str, gguf: Path, log_path: Path, timeout_s: float) -> None:
    api = Api(url, 5.0)
    end = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise EvalError(f"llama.cpp server for {gguf.name} exited with code {proc.returncode}: "
                            f"{_tail(log_path, 5)}", hint=f"see {log_path}")
        try:
            api.probe(timeout=2.0)
            break
        except EvalError:
            if time.monotonic() > end:
                raise EvalError(f"llama.cpp server for {gguf.name} did not answer within {timeout_s:g}s",
                                hint=f"see {log_path}") from None
            time.sleep(0.25)
    # one token, so a server that cannot compute on this CPU shows it now rather than mid-run
    reply = api.chat([{"role": "user", "content": "hi"}], max_tokens=1, temperature=0.0)
    if reply.error:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(3)   # a crashed server may not be reaped yet


@contextlib.contextmanager
def temp_server(cfg: Config, gguf: Path, alias: str, log_path: Path, *,
                safe_mode: Optional[bool] = None) -> Iterator[TempServer]:
    """Serve ``gguf`` with llama-cpp-python on a free loopback port for the duration of the block.

    A server that dies of SIGILL on its first token is restarted once in safe mode (no extra
    weight buffers), and later servers of this process start that way.
    """
    from .tools.proc import kill_group

    gguf = Path(gguf)
    if not gguf.is_file():
        raise EvalError(f"GGUF {gguf} not found")
    safe = (_SAFE_MODE["on"] or _known_quirk(cfg)) if safe_mode is None else safe_mode
    timeout_s = cfg.deployment.llamacpp.startup_timeout_s
    while True:
        proc, url = _spawn_server(cfg, gguf, alias, log_path, safe)
        try:
            _wait_ready(proc, url, gguf, log_path, timeout_s)
        except BaseException:
            kill_group(proc)
            raise
        if proc.poll() == -signal.SIGILL and not safe:
            _SAFE_MODE["on"] = safe = True
            continue
        if proc.poll() is not None:
            raise EvalError(f"llama.cpp server for {gguf.name} exited with code {proc.returncode} on its first "
                            f"completion: {_tail(log_path, 5)}", hint=f"see {log_path}")
        break
    try:
        yield TempServer(url, proc.pid, proc, safe)
    finally:
        kill_group(proc)


# ============================================================================= memory

def _proc_tree_rss(pid: int) -> Optional[int]:
    import psutil
    try:
        p = psutil.Process(pid)
        total = p.memory_info().rss
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += c.memory_info().rss
        return total
    except psutil.Error:
        return None


def _pid_listening_on(port: int) -> Optional[int]:
    import psutil
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return c.pid
    except (psutil.Error, OSError):
        return None
    return None


def gpu_memory_bytes(pid: int) -> Optional[int]:
    """GPU memory used by ``pid`` and its children via NVML; None without NVML or a GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    import psutil
    try:
        pids = {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        pids = {pid}
    try:
        pynvml.nvmlInit()
    except Exception:  # NVML raises its own error types; no driver means no GPU numbers
        return None
    try:
        used = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                if p.pid in pids and p.usedGpuMemory:
                    used += p.usedGpuMemory
        return used
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


# ============================================================================= results

@dataclass
class SampleResult:
    target: str
    sample_id: str
    repeat: int
    response: str = ""
    error: Optional[str] = None
    latency_s: Optional[float] = None
    ttft_s: Optional[float] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    gen_tps: Optional[float] = None
    prompt_tps: Optional[float] = None
    finish_reason: Optional[str] = None
    decode_s: Optional[float] = None
    tps_source: Optional[str] = None
    scores: dict = field(default_factory=dict)
    quality: Optional[float] = None
    tags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tags"] = list(self.tags)
        return d


@dataclass
class TargetResult:
    target: EvalTarget
    status: str = "ok"                      # ok | partial | failed | down
    error: Optional[str] = None             # why a whole target failed (down, did not start)
    n_samples: int = 0
    aggregates: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"target": self.target.to_dict(), "status": self.status, "error": self.error,
                "n_samples": self.n_samples, "seconds": round(self.seconds, 3), "aggregates": self.aggregates}


@dataclass
class EvalResult:
    schema_version: int
    created_at: float
    seconds: float
    config: dict
    samples_path: Optional[str]
    samples: list[Sample]
    targets: list[TargetResult]
    results: list[SampleResult]
    comparison: list[dict]
    notes: list[str] = field(default_factory=list)
    reports: dict = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(1 for r in self.results if r.error)

    @property
    def ok(self) -> bool:
        return any(t.status in ("ok", "partial") for t in self.targets)

    def target(self, label: str) -> TargetResult:
        for t in self.targets:
            if t.target.label == label:
                return t
        raise KeyError(label)

    def results_for(self, label: str) -> list[SampleResult]:
        return [r for r in self.results if r.target == label]

    def to_dict(self) -> dict:
        return {"schema_version": self.schema_version, "created_at": self.created_at,
                "seconds": round(self.seconds, 3), "config": self.config, "samples_path": self.samples_path,
                "n_samples": len(self.samples), "notes": self.notes, "reports": self.reports,
                "targets": [t.to_dict() for t in self.targets], "comparison": self.comparison,
                "samples": [s.to_dict() for s in self.samples],
                "results": [r.to_dict() for r in self.results]}


def _round(v: Optional[float], nd: int = 4) -> Optional[float]:
    return None if v is None else round(float(v), nd)


def _rounded(d: dict, nd: int = 4) -> dict:
    return {k: _round(v, nd) if isinstance(v, float) else v for k, v in d.items()}


def _quality_means(rows: list[SampleResult]) -> dict:
    out = {k: _round(metrics.mean(r.scores.get(k) for r in rows if not r.error)) for k in metrics.QUALITY_METRICS}
    out["quality"] = _round(metrics.mean(r.quality for r in rows if not r.error))
    return out


def _gen_tps(ok: list[SampleResult]) -> tuple[Optional[float], Optional[str]]:
    """Decode speed: the server's timings when reported, else the stream's token arrival times.

    When a stream's tokens arrive in bursts (a tiny model finishes before the first chunk is
    flushed) the arrival window says nothing; then the end-to-end rate is the honest number.
    """
    server = [r.gen_tps for r in ok if r.tps_source == "server"]
    if server:
        return metrics.mean(server), "server"
    toks = sum((r.completion_tokens or 0) - 1 for r in ok if r.decode_s and (r.completion_tokens or 0) > 1)
    window = sum(r.decode_s for r in ok if r.decode_s and (r.completion_tokens or 0) > 1)
    latency = sum(r.latency_s or 0 for r in ok)
    if toks and window > 0.05 * latency:
        return toks / window, "stream"
    n = sum(r.completion_tokens or 0 for r in ok)
    return (n / latency, "end-to-end") if n and latency else (None, None)


def aggregate(rows: list[SampleResult]) -> dict:
    """Latency, TTFT, throughput and quality over one target's rows (errors count as errors only)."""
    ok = [r for r in rows if not r.error]
    gen_tps, tps_source = _gen_tps(ok)
    total_lat = sum(r.latency_s or 0 for r in ok)
    tags: dict[str, list[SampleResult]] = {}
    for r in rows:
        for t in r.tags:
            tags.setdefault(t, []).append(r)
    return {
        "requests": len(rows), "ok": len(ok), "errors": len(rows) - len(ok),
        "latency_s": _rounded(metrics.summarize([r.latency_s for r in ok])),
        "ttft_s": _rounded(metrics.summarize([r.ttft_s for r in ok])),
        "gen_tokens_per_s": _round(gen_tps, 2), "gen_tokens_per_s_source": tps_source,
        "e2e_tokens_per_s": _round(sum(r.completion_tokens or 0 for r in ok) / total_lat if total_lat else None, 2),
        "prompt_tokens_per_s": _round(metrics.mean(r.prompt_tps for r in ok), 2),
        "completion_tokens_mean": _round(metrics.mean(r.completion_tokens for r in ok), 2),
        "quality": _quality_means(rows),
        "tags": {t: {"requests": len(rs), "errors": sum(1 for r in rs if r.error), **_quality_means(rs)}
                 for t, rs in sorted(tags.items())},
    }


def compare(targets: list[TargetResult]) -> list[dict]:
    """Side-by-side rows; each format's quality delta to the best format of its model and to its base."""
    rows = []
    by_model: dict[str, list[TargetResult]] = {}
    for t in targets:
        by_model.setdefault(t.target.model, []).append(t)
    for model, ts in by_model.items():
        scored = [t for t in ts if not t.target.is_base and t.aggregates.get("quality", {}).get("quality") is not None]
        # ties go to the smaller file: same quality for less memory
        best = max(scored, key=lambda t: (t.aggregates["quality"]["quality"],
                                          -(t.aggregates.get("memory", {}).get("file_mib") or 0)), default=None)
        base = next((t for t in ts if t.target.is_base), None)
        base_q = base.aggregates.get("quality", {}).get("quality") if base else None
        for t in ts:
            a, q = t.aggregates, t.aggregates.get("quality", {})
            mem = a.get("memory", {})
            row = {
                "label": t.target.label, "model": model, "format": t.target.format, "is_base": t.target.is_base,
                "live": t.target.live, "status": t.status, "errors": a.get("errors", 0),
                "requests": a.get("requests", 0),
                "quality": q.get("quality"), "exact": q.get("exact"), "contains": q.get("contains"),
                "rouge_l": q.get("rouge_l"), "chrf": q.get("chrf"),
                "latency_p50_s": a.get("latency_s", {}).get("p50"), "latency_p95_s": a.get("latency_s", {}).get("p95"),
                "ttft_p50_s": a.get("ttft_s", {}).get("p50"), "gen_tokens_per_s": a.get("gen_tokens_per_s"),
                "prompt_tokens_per_s": a.get("prompt_tokens_per_s"),
                "file_mib": mem.get("file_mib"), "rss_mib": mem.get("rss_mib"), "gpu_mib": mem.get("gpu_mib"),
                "best_format": best.target.format if best else None,
                "delta_vs_best": None, "delta_vs_base": None,
            }
            if q.get("quality") is not None:
                if best is not None and not t.target.is_base:
                    row["delta_vs_best"] = _round(q["quality"] - best.aggregates["quality"]["quality"])
                if base_q is not None and not t.target.is_base:
                    row["delta_vs_base"] = _round(q["quality"] - base_q)
            rows.append(row)
    return rows


# ============================================================================= running

class _TargetRun:
    def __init__(self, cfg: Config, target: EvalTarget, samples: list[Sample], tick: Callable[[str], None]):
        self.cfg, self.t, self.samples, self.tick = cfg, target, samples, tick
        self.ev = cfg.evaluation
        self.serial = threading.Lock()
        self.serialize = False
        self.peak_rss = 0
        self.pid: Optional[int] = None
        self.notes: list[str] = []
        # a server we start has the configured context; a given one has what its target says
        self.n_ctx = target.n_ctx or (None if target.base_url else cfg.deployment.llamacpp.n_ctx)

    def _error_rows(self, message: str) -> list[SampleResult]:
        rows = []
        for rep in range(self.ev.repeats):
            for s in self.samples:
                rows.append(SampleResult(self.t.label, s.id, rep, error=message, tags=s.tags))
                self.tick(self.t.label)
        return rows

    def _sample_rss(self) -> None:
        if self.pid:
            rss = _proc_tree_rss(self.pid)
            if rss:
                self.peak_rss = max(self.peak_rss, rss)

    def _one(self, api: Api, s: Sample, rep: int) -> SampleResult:
        msgs = self._messages(s)
        n_ctx = self.n_ctx
        if n_ctx:
            n = api.count_tokens("\n".join(m["content"] for m in msgs))
            # chat templates add a few tokens per message around the content
            if n is not None and n + 4 * len(msgs) + 4 >= n_ctx:
                return SampleResult(self.t.label, s.id, rep, error=f"prompt is about {n} tokens, longer than the "
                                    f"context of {n_ctx} tokens", prompt_tokens=n, tags=s.tags)
        kw = {"max_tokens": self.ev.max_tokens, "temperature": self.ev.temperature}
        if self.serialize:
            with self.serial:
                reply = api.chat(msgs, **kw)
        else:
            reply = api.chat(msgs, **kw)
        tries = 0
        while reply.interrupted and tries < 3:
            self.serialize = True
            tries += 1
            with self.serial:
                reply = api.chat(msgs, **kw)
        if reply.error and not reply.text and reply.error.startswith("the stream ended"):
            reply.error = api.diagnose(msgs, **kw) or reply.error
        res = SampleResult(self.t.label, s.id, rep, reply.text, reply.error, reply.latency_s, reply.ttft_s,
                           reply.prompt_tokens, reply.completion_tokens, reply.gen_tps, reply.prompt_tps,
                           reply.finish_reason, reply.decode_s, reply.tps_source, tags=s.tags)
        if reply.interrupted:
            res.error = "the server kept cutting this answer short (llama-cpp-python interrupt_requests)"
        if not res.error:
            res.scores = {k: _round(v) for k, v in
                          metrics.score_response(res.response, s.reference, s.expected_contains).items()}
            res.quality = _round(metrics.combined_quality(res.scores))
        return res

    def _messages(self, s: Sample) -> list[dict]:
        return with_system_prompt(s.messages, self.t.system_prompt)

    def _measure(self, api: Api) -> list[SampleResult]:
        for i in range(self.ev.warmup):
            api.chat(self._messages(self.samples[i % len(self.samples)]), max_tokens=self.ev.max_tokens,
                     temperature=self.ev.temperature)
        jobs = [(s, rep) for rep in range(self.ev.repeats) for s in self.samples]
        out: list[SampleResult] = []
        with cf.ThreadPoolExecutor(min(self.ev.concurrency, len(jobs))) as pool:
            futs = [pool.submit(self._one, api, s, rep) for s, rep in jobs]
            for f in cf.as_completed(futs):
                out.append(f.result())
                self._sample_rss()
                self.tick(self.t.label)
        if self.serialize:
            self.notes.append(f"{self.t.label}: the server cut answers short when requests overlapped "
                              "(llama-cpp-python's interrupt_requests); those were re-sent one at a time")
        order = {(s.id, rep): i for i, (s, rep) in enumerate(jobs)}
        out.sort(key=lambda r: order[(r.sample_id, r.repeat)])
        return out

    def _serve(self, api_url: str, pid: Optional[int]) -> tuple[list[SampleResult], Optional[str]]:
        api = Api(api_url, self.ev.timeout_s)
        try:
            api.probe(timeout=min(10.0, self.ev.timeout_s))
        except EvalError as exc:
            return self._error_rows(exc.one_line()), exc.one_line()
        if pid is None and api.host in ("127.0.0.1", "localhost", "::1"):
            pid = _pid_listening_on(api.port)
        self.pid = pid or None   # 0: the registry says the backend is stopped
        self._sample_rss()
        return self._measure(api), None

    def _serve_file(self) -> tuple[list[SampleResult], Optional[str], Optional[int]]:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.t.label)
        log_path = Path(self.cfg.logging.log_dir) / self.t.model / f"eval-server-{safe}.log"
        try:
            with temp_server(self.cfg, Path(self.t.gguf_path), safe, log_path) as srv:
                if srv.safe_mode:
                    self.notes.append(SAFE_MODE_NOTE)
                rows, err = self._serve(srv.url, srv.pid)
                return rows, err, gpu_memory_bytes(srv.pid)
        except EvalError as exc:
            return self._error_rows(exc.one_line()), exc.one_line(), None

    def run(self) -> tuple[TargetResult, list[SampleResult]]:
        t0 = time.monotonic()
        tr = TargetResult(self.t, n_samples=len(self.samples))
        gpu: Optional[int] = None
        if self.t.base_url:
            rows, err = self._serve(self.t.base_url, self.t.pid)
            gpu = gpu_memory_bytes(self.pid) if self.pid else None
        else:
            rows, err, gpu = self._serve_file()
        agg = aggregate(rows)
        size = None
        if self.t.gguf_path:
            with contextlib.suppress(OSError):
                size = os.path.getsize(self.t.gguf_path)
        mib = lambda b: _round(b / 2**20, 1) if b else None  # noqa: E731
        agg["memory"] = {"rss_mib": mib(self.peak_rss), "gpu_mib": mib(gpu) if gpu is not None else None,
                         "file_mib": mib(size), "pid": self.pid}
        tr.aggregates = agg
        tr.error = err
        tr.status = ("down" if err else "failed" if agg["ok"] == 0 else "partial" if agg["errors"] else "ok")
        tr.seconds = time.monotonic() - t0
        return tr, rows


def _config_summary(cfg: Config, samples_path: Optional[str], n_samples: int) -> dict:
    ev = cfg.evaluation
    return {"samples": samples_path, "n_samples": n_samples, "concurrency": ev.concurrency, "warmup": ev.warmup,
            "repeats": ev.repeats, "max_tokens": ev.max_tokens, "temperature": ev.temperature,
            "timeout_s": ev.timeout_s, "n_ctx": cfg.deployment.llamacpp.n_ctx,
            "n_gpu_layers": cfg.deployment.llamacpp.n_gpu_layers, "include_base": ev.include_base,
            "quality": "mean of the metrics a sample has: exact, contains, ROUGE-L F1, chrF (each 0..1)"}


def evaluate(cfg: Config, models: Optional[Sequence[str]] = None, *,
             samples: Path | str | Sequence[Sample] | None = None, formats: Optional[Sequence[str]] = None,
             targets: Optional[Sequence[EvalTarget]] = None, progress: Optional[ProgressFn] = None,
             output_dir: Path | str | None = None, write: bool = True) -> EvalResult:
    """Evaluate targets (default: everything deployed and quantized for ``models``) and write reports.

    Reports go to ``output_dir`` (default evaluation.output_dir) unless ``write`` is False. A target
    that is down or fails yields error rows; raises only for bad input or nothing to evaluate.
    """
    t0 = time.monotonic()
    created = time.time()
    if samples is None or isinstance(samples, (str, Path)):
        samples_path = str(Path(samples) if samples is not None else cfg.evaluation.samples)
        sample_list = load_samples(samples_path)
    else:
        samples_path, sample_list = None, list(samples)
        if not sample_list:
            raise InputError("no samples to evaluate")
    notes: list[str] = []
    if targets is None:
        target_list, notes = build_targets(cfg, models, formats)
    else:
        target_list = list(targets)
        if models:
            target_list = [t for t in target_list if t.model in models]
        if formats:
            want = {f.strip().upper() for f in formats}
            target_list = [t for t in target_list if t.is_base or t.format in want]
    if not target_list:
        why = "; ".join(notes[:3])
        raise EvalError("nothing to evaluate: no deployed model and no quantized GGUF found"
                        + (f" ({why})" if why else ""),
                        hint="run the pipeline through quantize/deploy first, or check --model / --formats")
    labels = [t.label for t in target_list]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise InputError(f"target labels must be unique; repeated: {', '.join(dup)}")
    for t in target_list:
        if not t.base_url and not t.gguf_path:
            raise InputError(f"target {t.label!r} has neither base_url nor gguf_path")

    plan = [(t, [s for s in sample_list if s.applies_to(t.model)]) for t in target_list]
    for t, ss in plan:
        if not ss:
            notes.append(f"{t.label}: no sample applies to model {t.model}; skipped")
    plan = [(t, ss) for t, ss in plan if ss]
    total = sum(len(ss) * cfg.evaluation.repeats for _, ss in plan)
    done = [0]
    lock = threading.Lock()

    def tick(label: str) -> None:
        with lock:
            done[0] += 1
            n = done[0]
        if progress:
            progress(f"evaluating {label}", n, total)

    target_results: list[TargetResult] = []
    all_rows: list[SampleResult] = []
    for t, ss in plan:
        if progress:
            progress(f"evaluating {t.label}", done[0], total)
        run = _TargetRun(cfg, t, ss, tick)
        tr, rows = run.run()
        notes += [n for n in run.notes if n not in notes]
        target_results.append(tr)
        all_rows += rows
    result = EvalResult(SCHEMA_VERSION, created, time.monotonic() - t0,
                        _config_summary(cfg, samples_path, len(sample_list)), samples_path, sample_list,
                        target_results, all_rows, compare(target_results), notes)
    if write:
        from .report import write_reports
        out = Path(output_dir) if output_dir is not None else Path(cfg.evaluation.output_dir)
        write_reports(result, out, charts=cfg.evaluation.charts)
    return result


def render(result: EvalResult):
    """A rich renderable of the comparison (the CLI prints it; the library never does)."""
    from .report import render as _render
    return _render(result)
