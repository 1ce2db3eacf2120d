"""Health of deployed models: the GGUF on disk, the API, a real completion, and the machine.

Every network call has a deadline (``health_check.timeout_s``) that bounds the whole request,
not just each socket read, so a hung or trickling server turns into a failed check instead of a
hung health command. Only stdlib HTTP is used: the check must work where nothing else does.
"""
from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Protocol, Sequence
from urllib.parse import urlsplit

from .errors import LoradeployError
from .fsutil import free_bytes

if TYPE_CHECKING:
    from .config import Config, HealthCheckConfig

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
EXIT_CODES = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}
GIB = 1024 ** 3
MIB = 1024 ** 2
_MAX_BODY = 4 * MIB          # /v1/models or an error page; more than this is not an API answer
_MAX_LINE = 1 * MIB          # one SSE line
_CONNECT_CAP_S = 5.0         # a loopback connect that takes longer will not get better


class EndpointLike(Protocol):
    """What serve.endpoints() returns; any object with these attributes will do."""
    model: str
    version: Optional[str]
    format: Optional[str]
    base_url: str
    port: int
    pid: Optional[int]
    gguf_path: Optional[str | os.PathLike]
    sha256: Optional[str]


@dataclass
class Check:
    name: str
    status: str                       # pass | warn | fail | skip (skip never changes the verdict)
    detail: str
    remedy: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.remedy:
            d["remedy"] = self.remedy
        if self.metrics:
            d["metrics"] = self.metrics
        return d


def verdict(checks: Iterable[Check]) -> str:
    statuses = {c.status for c in checks}
    if FAIL in statuses:
        return UNHEALTHY
    return DEGRADED if WARN in statuses else HEALTHY


@dataclass
class ModelHealth:
    model: str
    version: Optional[str] = None
    format: Optional[str] = None
    base_url: Optional[str] = None
    gguf_path: Optional[str] = None
    checks: list[Check] = field(default_factory=list)

    @property
    def status(self) -> str:
        return verdict(self.checks)

    @property
    def metrics(self) -> dict[str, Any]:
        """Headline numbers: worst case over the test prompts."""
        out: dict[str, Any] = {}
        for c in self.checks:
            if c.name == "model.performance":
                out.update({k: c.metrics[k] for k in ("latency_s", "ttft_s", "tokens_per_s",
                                                      "completion_tokens") if k in c.metrics})
            elif c.name == "api.models" and "response_s" in c.metrics:
                out["models_response_s"] = c.metrics["response_s"]
            elif c.name == "system.process" and "rss_mib" in c.metrics:
                out["rss_mib"] = c.metrics["rss_mib"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "version": self.version, "format": self.format,
                "base_url": self.base_url, "gguf_path": self.gguf_path, "metrics": self.metrics,
                "checks": [c.to_dict() for c in self.checks]}


@dataclass
class HealthReport:
    models: dict[str, ModelHealth] = field(default_factory=dict)
    system: list[Check] = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def status(self) -> str:
        return verdict([*self.system, *(c for m in self.models.values() for c in m.checks)])

    @property
    def seconds(self) -> float:
        return round(self.finished_at - self.started_at, 3)

    def model_statuses(self) -> dict[str, str]:
        return {k: m.status for k, m in self.models.items()}

    def problems(self, model: str) -> dict[str, str]:
        """check name -> detail for the model's failed and warned checks (for notifications)."""
        m = self.models.get(model)
        return {c.name: c.detail for c in (m.checks if m else []) if c.status in (FAIL, WARN)}

    def failures(self) -> list[tuple[str, Check]]:
        return [(k, c) for k, m in self.models.items() for c in m.checks if c.status == FAIL] + \
               [("system", c) for c in self.system if c.status == FAIL]

    def warnings(self) -> list[tuple[str, Check]]:
        return [(k, c) for k, m in self.models.items() for c in m.checks if c.status == WARN] + \
               [("system", c) for c in self.system if c.status == WARN]

    def to_dict(self) -> dict[str, Any]:
        iso = lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")  # noqa: E731
        return {"status": self.status, "exit_code": exit_code(self), "started_at": iso(self.started_at),
                "finished_at": iso(self.finished_at), "seconds": self.seconds,
                "models": {k: m.to_dict() for k, m in self.models.items()},
                "system": {"status": verdict(self.system), "checks": [c.to_dict() for c in self.system]}}


def exit_code(report: HealthReport) -> int:
    return EXIT_CODES[report.status]


# ----------------------------------------------------------------------------- file checks

def file_checks(endpoint: EndpointLike) -> list[Check]:
    """Structure and checksum of the served GGUF; read through our own parser, never loaded."""
    from .gguf_check import validate_gguf

    path = Path(endpoint.gguf_path) if endpoint.gguf_path else None
    if path is None:
        return [Check("file.exists", SKIP, "no GGUF path is known for this endpoint")]
    if not path.is_file():
        return [Check("file.exists", FAIL, f"{path} does not exist",
                      f"redeploy it (loradeploy run -m {endpoint.model} --from-stage deploy) "
                      "or roll back to a backup")]
    checks = [Check("file.exists", PASS, str(path), metrics={"size": path.stat().st_size})]
    expected = endpoint.sha256 or None
    try:
        report = validate_gguf(path, expected_sha256=expected)
    except LoradeployError as exc:  # a malformed sha256 in the record
        report = validate_gguf(path)
        checks.append(Check("file.sha256", FAIL, exc.one_line(), "re-run the deploy stage to re-record it"))
        expected = None
    problems = [p for p in report.errors if p.code != "sha256"]
    info = {"quant": report.quant, "architecture": report.architecture, "tensors": report.tensor_count,
            "parameters": report.parameter_count}
    if problems:
        listed = "; ".join(f"{p.code}: {p.message}" for p in problems[:3])
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        checks.append(Check("file.structure", FAIL, f"not a valid GGUF: {listed}{more}",
                            "the file is corrupt: re-run quantize and deploy, or roll back", info))
    elif report.warnings:
        checks.append(Check("file.structure", WARN, "; ".join(p.message for p in report.warnings[:3]),
                            f"inspect it: loradeploy inspect {path}", info))
    else:
        checks.append(Check("file.structure", PASS, f"valid GGUF v{report.version}, {report.architecture}, "
                                                   f"{report.quant}, {report.tensor_count} tensors", metrics=info))
    if expected is None:
        if not any(c.name == "file.sha256" for c in checks):
            checks.append(Check("file.sha256", SKIP, "no sha256 recorded for this deployment"))
    elif any(p.code == "sha256" for p in report.errors):
        checks.append(Check("file.sha256", FAIL, f"sha256 {report.sha256[:12]}... differs from the recorded "
                                                 f"{expected[:12]}...",
                            "the file changed after deploy: redeploy it or roll back to a backup",
                            {"sha256": report.sha256, "expected": expected}))
    else:
        checks.append(Check("file.sha256", PASS, "matches the run record", metrics={"sha256": report.sha256}))
    return checks


# ----------------------------------------------------------------------------- HTTP with a deadline

class _Timeout(Exception):
    pass


class _HttpError(Exception):
    def __init__(self, status: int, reason: str, body: bytes):
        self.status, self.reason, self.body = status, reason, body
        super().__init__(f"HTTP {status} {reason}")

    def describe(self) -> str:
        text = " ".join(self.body[:300].decode("utf-8", "replace").split())
        return f"HTTP {self.status} {self.reason}" + (f": {text}" if text else "")


@dataclass
class _Target:
    scheme: str
    host: str
    port: int
    prefix: str

    @classmethod
    def of(cls, endpoint: EndpointLike) -> "_Target":
        u = urlsplit(endpoint.base_url if "://" in endpoint.base_url else f"http://{endpoint.base_url}")
        prefix = u.path.rstrip("/")
        if prefix.endswith("/v1"):
            prefix = prefix[:-3]
        return cls(u.scheme or "http", u.hostname or "127.0.0.1", u.port or endpoint.port or 80, prefix)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise _Timeout(f"no complete answer within {self.seconds:g}s")
        return left


def _open(t: _Target, method: str, path: str, body: Optional[dict], deadline: _Deadline):
    cls = http.client.HTTPSConnection if t.scheme == "https" else http.client.HTTPConnection
    conn = cls(t.host, t.port, timeout=deadline.left())
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Accept": "application/json, text/event-stream"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, t.prefix + path, body=data, headers=headers)
        # Kept: getresponse() drops conn.sock when the server closes after answering, but the
        # response still reads from this socket, and every read needs the remaining time.
        sock = conn.sock
        sock.settimeout(deadline.left())
        resp = conn.getresponse()
    except socket.timeout:
        conn.close()
        raise _Timeout(f"no answer within {deadline.seconds:g}s") from None
    except BaseException:
        conn.close()
        raise
    return conn, resp, sock


def _read_body(sock, resp, deadline: _Deadline) -> bytes:
    chunks, total = [], 0
    try:
        while True:
            sock.settimeout(deadline.left())
            part = resp.read1(65536)
            if not part:
                return b"".join(chunks)
            chunks.append(part)
            total += len(part)
            if total > _MAX_BODY:
                raise http.client.HTTPException(f"answer larger than {_MAX_BODY // MIB} MiB")
    except socket.timeout:
        raise _Timeout(f"answer not finished within {deadline.seconds:g}s") from None


def _get_json(t: _Target, path: str, timeout_s: float) -> Any:
    deadline = _Deadline(timeout_s)
    conn, resp, sock = _open(t, "GET", path, None, deadline)
    try:
        body = _read_body(sock, resp, deadline)
    finally:
        conn.close()
    if resp.status != 200:
        raise _HttpError(resp.status, resp.reason, body)
    return json.loads(body)


def _sse_events(sock, resp, deadline: _Deadline, state: dict) -> Iterable[dict]:
    """Decoded ``data:`` payloads of a server-sent event stream, ending at [DONE] (which sets
    ``state["done"]``) or EOF."""
    try:
        while True:
            sock.settimeout(deadline.left())
            line = resp.readline(_MAX_LINE)
            deadline.left()
            if not line:
                return
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                state["done"] = True
                return
            yield json.loads(payload)
    except socket.timeout:
        raise _Timeout(f"stream not finished within {deadline.seconds:g}s") from None


# ----------------------------------------------------------------------------- API checks

def _restart_hint(endpoint: EndpointLike) -> str:
    return (f"restart it: loradeploy serve start -m {endpoint.model}; "
            f"its log: loradeploy serve logs -m {endpoint.model}")


def _port_check(t: _Target, endpoint: EndpointLike, hc: "HealthCheckConfig") -> Check:
    timeout = min(hc.timeout_s, _CONNECT_CAP_S)
    t0 = time.monotonic()
    try:
        with socket.create_connection((t.host, t.port), timeout=timeout):
            pass
    except socket.timeout:
        return Check("api.port", FAIL, f"connecting to {t.where} timed out after {timeout:g}s",
                     "check the host/port and any firewall; " + _restart_hint(endpoint))
    except OSError as exc:
        why = "connection refused: nothing listens there" if isinstance(exc, ConnectionRefusedError) \
            else (exc.strerror or str(exc))
        return Check("api.port", FAIL, f"{t.where}: {why}", _restart_hint(endpoint))
    ms = (time.monotonic() - t0) * 1000
    return Check("api.port", PASS, f"{t.where} accepts connections", metrics={"connect_ms": round(ms, 2)})


def _listed_id(ids: list[str], endpoint: EndpointLike) -> Optional[str]:
    if endpoint.model in ids:
        return endpoint.model
    names = {endpoint.model, f"{endpoint.model}_{endpoint.version}"}
    if endpoint.gguf_path:
        names |= {str(endpoint.gguf_path), Path(endpoint.gguf_path).name, Path(endpoint.gguf_path).stem}
    for i in ids:
        if i in names or Path(i).name in names:
            return i
    return None


def _models_check(t: _Target, endpoint: EndpointLike, hc: "HealthCheckConfig") -> tuple[Check, Optional[str]]:
    t0 = time.monotonic()
    try:
        data = _get_json(t, "/v1/models", hc.timeout_s)
    except _Timeout as exc:
        return Check("api.models", FAIL, f"GET /v1/models on {t.where}: {exc}: the server is hung or overloaded",
                     "restart the server; " + _restart_hint(endpoint)), None
    except _HttpError as exc:
        return Check("api.models", FAIL, f"GET /v1/models answered {exc.describe()}",
                     "read the server log; " + _restart_hint(endpoint), {"http_status": exc.status}), None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return Check("api.models", FAIL, f"GET /v1/models on {t.where} failed: {type(exc).__name__}: {exc}",
                     "is this an OpenAI-compatible server? " + _restart_hint(endpoint)), None
    secs = time.monotonic() - t0
    entries = data.get("data") if isinstance(data, dict) else None
    ids = [str(e.get("id")) for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    found = _listed_id(ids, endpoint)
    metrics = {"response_s": round(secs, 4), "models": ids[:10]}
    if found is None:
        return Check("api.models", FAIL, f"{t.where} serves {ids or 'no models'}, not {endpoint.model}",
                     f"another server holds port {t.port}, or the model failed to load; " + _restart_hint(endpoint),
                     metrics), None
    if secs > hc.max_latency_s:
        return Check("api.models", WARN, f"{found} listed, but /v1/models took {secs:.2f}s "
                                         f"(over {hc.max_latency_s:g}s)",
                     "the server is overloaded: check CPU/GPU load", metrics), found
    return Check("api.models", PASS, f"{found} loaded; /v1/models answered in {secs * 1000:.0f} ms",
                 metrics=metrics), found


# ----------------------------------------------------------------------------- model test

@dataclass
class _Completion:
    text: str = ""
    finish_reason: Optional[str] = None
    latency_s: float = 0.0
    ttft_s: Optional[float] = None
    tokens: int = 0
    tokens_per_s: Optional[float] = None


def _unstreamed(answer: dict) -> dict:
    choices = [{"delta": {"content": (c.get("message") or {}).get("content")},
                "finish_reason": c.get("finish_reason")} for c in answer.get("choices") or []]
    return {"choices": choices, "usage": answer.get("usage")}


def _complete(t: _Target, model_id: str, prompt: str, hc: "HealthCheckConfig") -> _Completion:
    body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": hc.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    deadline = _Deadline(hc.timeout_s)
    t0 = time.monotonic()
    conn, resp, sock = _open(t, "POST", "/v1/chat/completions", body, deadline)
    out = _Completion()
    parts: list[str] = []
    first = last = None
    usage_tokens = None
    streamed = True
    state = {"done": False}
    try:
        if resp.status != 200:
            raise _HttpError(resp.status, resp.reason, _read_body(sock, resp, deadline))
        if (resp.getheader("Content-Type") or "").startswith("application/json"):
            # A server that ignores "stream": one JSON answer, so no time to first token.
            events: Iterable[dict] = [_unstreamed(json.loads(_read_body(sock, resp, deadline)))]
            streamed = False
        else:
            events = _sse_events(sock, resp, deadline, state)
        for event in events:
            if not isinstance(event, dict):
                raise ValueError(f"stream event is not an object: {str(event)[:100]}")
            if event.get("error"):
                raise http.client.HTTPException(f"the server reported an error mid-stream: "
                                                f"{str(event['error'])[:300]}")
            if isinstance(event.get("usage"), dict) and event["usage"].get("completion_tokens") is not None:
                usage_tokens = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    now = time.monotonic()
                    first = first if first is not None else now
                    last = now
                    parts.append(content)
                if choice.get("finish_reason"):
                    out.finish_reason = choice["finish_reason"]
        if streamed and not state["done"] and out.finish_reason is None:
            raise http.client.HTTPException(
                f"the stream ended after {len(parts)} token(s) with no finish_reason: the server closed "
                "the connection mid-answer (did it crash?)")
    finally:
        conn.close()
    end = time.monotonic()
    out.text = "".join(parts)
    out.latency_s = end - t0
    out.tokens = usage_tokens if usage_tokens is not None else len(parts)
    if first is not None and not streamed:
        out.tokens_per_s = out.tokens / out.latency_s if out.latency_s > 0 else None
    elif first is not None:
        out.ttft_s = first - t0
        # Decode rate after the first token; prompt processing is what TTFT measures.
        if out.tokens >= 2 and last > first:
            out.tokens_per_s = (out.tokens - 1) / (last - first)
        else:
            out.tokens_per_s = out.tokens / out.latency_s if out.latency_s > 0 else None
    return out


def _completion_check(name: str, t: _Target, endpoint: EndpointLike, model_id: str, prompt: str,
                      hc: "HealthCheckConfig") -> tuple[Check, Optional[_Completion]]:
    short = prompt if len(prompt) <= 40 else prompt[:37] + "..."
    try:
        c = _complete(t, model_id, prompt, hc)
    except _Timeout as exc:
        return Check(name, FAIL, f"chat completion for {short!r}: {exc}",
                     f"the server is hung or far too slow: restart it, or raise health_check.timeout_s "
                     f"({hc.timeout_s:g}s)"), None
    except _HttpError as exc:
        return Check(name, FAIL, f"chat completion answered {exc.describe()}",
                     "read the server log; " + _restart_hint(endpoint), {"http_status": exc.status}), None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return Check(name, FAIL, f"chat completion failed: {type(exc).__name__}: {exc}",
                     _restart_hint(endpoint)), None
    metrics = {"prompt": prompt, "answer": c.text[:200], "finish_reason": c.finish_reason,
               "latency_s": round(c.latency_s, 4), "ttft_s": None if c.ttft_s is None else round(c.ttft_s, 4),
               "completion_tokens": c.tokens,
               "tokens_per_s": None if c.tokens_per_s is None else round(c.tokens_per_s, 2)}
    answer = c.text.strip()
    if not answer:
        return Check(name, FAIL, f"empty answer to {short!r} (finish_reason {c.finish_reason})",
                     "the model emits nothing useful: check the chat template and the GGUF (loradeploy inspect)",
                     metrics), c
    if c.finish_reason == "length":
        return Check(name, WARN, f"answer ran out at max_tokens={hc.max_tokens} without a stop token",
                     "the model may not stop (chat template / EOS token); raise health_check.max_tokens "
                     "if long answers are expected", metrics), c
    if c.finish_reason != "stop":
        return Check(name, WARN, f"answer ended with finish_reason {c.finish_reason!r}, not 'stop'",
                     "check the server log", metrics), c
    if len(answer) < hc.min_response_length:
        return Check(name, WARN, f"answer has {len(answer)} characters, fewer than min_response_length "
                                 f"{hc.min_response_length}", "check the prompt and the model", metrics), c
    return Check(name, PASS, f"{len(answer)}-character answer, stopped properly: {answer[:60]!r}",
                 metrics=metrics), c


def _performance_check(done: list[_Completion], hc: "HealthCheckConfig") -> Check:
    latency = max(c.latency_s for c in done)
    ttfts = [c.ttft_s for c in done if c.ttft_s is not None]
    rates = [c.tokens_per_s for c in done if c.tokens_per_s is not None]
    metrics = {"latency_s": round(latency, 4), "ttft_s": round(max(ttfts), 4) if ttfts else None,
               "tokens_per_s": round(min(rates), 2) if rates else None,
               "completion_tokens": sum(c.tokens for c in done), "prompts": len(done)}
    text = (f"latency {latency:.2f}s, TTFT {metrics['ttft_s'] or 0:.3f}s, "
            f"{metrics['tokens_per_s'] or 0:.1f} tokens/s (worst of {len(done)})")
    slow = []
    if latency > hc.max_latency_s:
        slow.append(f"latency {latency:.2f}s over max_latency_s {hc.max_latency_s:g}")
    if rates and min(rates) < hc.min_tokens_per_s:
        slow.append(f"{min(rates):.1f} tokens/s under min_tokens_per_s {hc.min_tokens_per_s:g}")
    if slow:
        return Check("model.performance", WARN, "degraded: " + "; ".join(slow),
                     "the machine is busy or the model too big for it: check CPU/GPU load, use a smaller "
                     "quant, offload layers to the GPU (n_gpu_layers), or relax the thresholds", metrics)
    return Check("model.performance", PASS, text, metrics=metrics)


def model_checks(endpoint: EndpointLike, hc: "HealthCheckConfig", model_id: str,
                 prompts: Sequence[str]) -> list[Check]:
    t = _Target.of(endpoint)
    checks, done = [], []
    for i, prompt in enumerate(prompts):
        name = "model.completion" if len(prompts) == 1 else f"model.completion[{i}]"
        check, c = _completion_check(name, t, endpoint, model_id, prompt, hc)
        checks.append(check)
        if c is not None and c.text.strip():
            done.append(c)
    if done:
        checks.append(_performance_check(done, hc))
    return checks


# ----------------------------------------------------------------------------- system checks

def process_check(endpoint: EndpointLike) -> Check:
    import psutil

    if not endpoint.pid:
        return Check("system.process", SKIP, "no server process recorded (stopped, or not started by loradeploy)")
    try:
        p = psutil.Process(endpoint.pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            raise psutil.NoSuchProcess(endpoint.pid)
        rss = p.memory_info().rss
    except psutil.NoSuchProcess:
        return Check("system.process", FAIL, f"server process {endpoint.pid} is not running",
                     _restart_hint(endpoint))
    except psutil.Error as exc:
        return Check("system.process", SKIP, f"cannot read process {endpoint.pid}: {exc}")
    return Check("system.process", PASS, f"pid {endpoint.pid}, RSS {rss / MIB:.0f} MiB",
                 metrics={"pid": endpoint.pid, "rss_mib": round(rss / MIB, 1)})


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_checks(paths: dict[str, Path], min_free_gb: float) -> list[Check]:
    """One check per filesystem among ``paths`` (label -> folder)."""
    seen: dict[int, list[str]] = {}
    order: list[tuple[int, Path]] = []
    for label, p in paths.items():
        dev = os.stat(_existing(Path(p))).st_dev
        if dev not in seen:
            seen[dev] = []
            order.append((dev, Path(p)))
        seen[dev].append(label)
    checks = []
    for dev, p in order:
        free = free_bytes(p) / GIB
        what = f"{free:.1f} GiB free at {p} ({', '.join(seen[dev])})"
        metrics = {"path": str(p), "free_gb": round(free, 2), "min_free_gb": min_free_gb}
        if free < min_free_gb:
            checks.append(Check("system.disk", WARN, f"low disk: {what}, under min_free_disk_gb {min_free_gb:g}",
                                "free space: prune old versions (deployment.keep_backups), delete F16 GGUFs "
                                "(quantization.keep_f16: false) or work folders", metrics))
        else:
            checks.append(Check("system.disk", PASS, what, metrics=metrics))
    return checks


def memory_check(min_free_gb: float) -> Check:
    import psutil

    vm = psutil.virtual_memory()
    avail = vm.available / GIB
    metrics = {"available_gb": round(avail, 2), "total_gb": round(vm.total / GIB, 2), "percent_used": vm.percent}
    text = f"{avail:.1f} of {vm.total / GIB:.1f} GiB available"
    if avail < min_free_gb:
        return Check("system.memory", WARN, f"low memory: {text}, under min_free_memory_gb {min_free_gb:g}",
                     "stop other models or processes, or serve a smaller quant", metrics)
    return Check("system.memory", PASS, text, metrics=metrics)


def gpu_checks(max_memory_fraction: float) -> list[Check]:
    try:
        import pynvml
    except ImportError:
        return [Check("system.gpu", SKIP, "skipped: NVML not installed (pip install nvidia-ml-py)")]
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [Check("system.gpu", SKIP, f"skipped: no GPU ({exc})")]
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return [Check("system.gpu", SKIP, "skipped: no GPU")]
        checks = []
        for i in range(count):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            except pynvml.NVMLError:
                util = None
            frac = mem.used / mem.total if mem.total else 0.0
            metrics = {"index": i, "name": name, "memory_used_gb": round(mem.used / GIB, 2),
                       "memory_total_gb": round(mem.total / GIB, 2), "memory_fraction": round(frac, 3),
                       "utilization_pct": util}
            text = (f"GPU {i} {name}: {mem.used / GIB:.1f}/{mem.total / GIB:.1f} GiB used"
                    + (f", {util}% busy" if util is not None else ""))
            if frac > max_memory_fraction:
                checks.append(Check("system.gpu", WARN, f"{text}: over max_gpu_memory_fraction "
                                                         f"{max_memory_fraction:g}",
                                    "free GPU memory: fewer n_gpu_layers, a smaller quant, or stop other jobs",
                                    metrics))
            else:
                checks.append(Check("system.gpu", PASS, text, metrics=metrics))
        return checks
    except pynvml.NVMLError as exc:
        return [Check("system.gpu", SKIP, f"skipped: NVML error ({exc})")]
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def system_checks(cfg: "Config", endpoints: Sequence[EndpointLike] = ()) -> list[Check]:
    hc = cfg.health_check
    paths = {"models_dir": cfg.deployment.models_dir, "work_dir": cfg.pipeline.work_dir}
    for ep in endpoints:
        if ep.gguf_path:
            paths.setdefault(f"{ep.model} GGUF", Path(ep.gguf_path).parent)
    return [*disk_checks(paths, hc.min_free_disk_gb), memory_check(hc.min_free_memory_gb),
            *gpu_checks(hc.max_gpu_memory_fraction)]


# ----------------------------------------------------------------------------- entry points

def probe(endpoint: EndpointLike, hc: "HealthCheckConfig", *, prompts: Optional[Sequence[str]] = None,
          files: bool = True) -> list[Check]:
    """Every per-endpoint check; ``prompts=[]`` skips the model test (a bare readiness probe),
    ``files=False`` skips hashing the GGUF."""
    checks = file_checks(endpoint) if files else []
    t = _Target.of(endpoint)
    port = _port_check(t, endpoint, hc)
    checks.append(port)
    prompts = list(hc.test_prompts if prompts is None else prompts)
    model_id = None
    if port.status == FAIL:
        checks.append(Check("api.models", SKIP, "not run: the port is unreachable"))
    else:
        models, model_id = _models_check(t, endpoint, hc)
        checks.append(models)
    if prompts:
        if model_id is None:
            checks.append(Check("model.completion", SKIP, "not run: the API checks failed"))
        else:
            checks.extend(model_checks(endpoint, hc, model_id, prompts))
    checks.append(process_check(endpoint))
    return checks


def _key(ep: EndpointLike, taken: dict) -> str:
    return ep.model if ep.model not in taken else f"{ep.model}@{ep.format or ep.port}"


def check_health(cfg: "Config", models: Optional[Sequence[str]] = None, *,
                 endpoints: Optional[Sequence[EndpointLike]] = None,
                 include_model_test: bool = True) -> HealthReport:
    """Health of the deployed models and of this machine.

    Without ``models`` every recorded deployment is checked; a model named in ``models`` that has
    no deployment is unhealthy. ``endpoints`` replaces what serve.endpoints() reports.
    """
    report = HealthReport(started_at=time.time())
    expected = list(models or [])
    for n in expected:
        cfg.model(n)  # unknown names fail early with the known list
    if endpoints is None:
        from .serve import endpoints as deployed
        endpoints = deployed(cfg, expected or None)
    eps = [e for e in endpoints if not expected or e.model in expected]
    hc = cfg.health_check
    prompts = hc.test_prompts if include_model_test else []
    for ep in eps:
        mh = ModelHealth(ep.model, ep.version, ep.format, ep.base_url,
                         str(ep.gguf_path) if ep.gguf_path else None)
        mh.checks = probe(ep, hc, prompts=prompts)
        report.models[_key(ep, report.models)] = mh
    for n in expected:
        if not any(ep.model == n for ep in eps):
            report.models[n] = ModelHealth(n, cfg.models[n].version, checks=[Check(
                "deploy.endpoint", FAIL, f"{n} is not deployed: no server is recorded for it",
                f"deploy it: loradeploy run -m {n}")])
    if not report.models:
        report.system.append(Check("deploy.endpoint", FAIL, "no deployed model to check",
                                   "deploy one: loradeploy run -m NAME"))
    report.system.extend(system_checks(cfg, eps))
    report.finished_at = time.time()
    return report


# ----------------------------------------------------------------------------- rendering

_STYLE = {PASS: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim",
          HEALTHY: "bold green", DEGRADED: "bold yellow", UNHEALTHY: "bold red"}


def _table(title, checks: Sequence[Check]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail", overflow="fold")
    table.add_column("remedy", overflow="fold", style="dim")
    for c in checks:
        table.add_row(c.name, Text(c.status.upper(), style=_STYLE[c.status]), c.detail, c.remedy)
    return table


def render(report: HealthReport):
    """A rich renderable: one table per model, one for the machine, then the verdict."""
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = []
    for key, m in report.models.items():
        title = Text.assemble((key, "bold"), f" {m.version or ''} {m.format or ''} {m.base_url or ''} ",
                              (m.status.upper(), _STYLE[m.status]))
        parts.append(_table(title, m.checks))
    parts.append(_table(Text.assemble(("system ", "bold"), (verdict(report.system).upper(),
                                                             _STYLE[verdict(report.system)])), report.system))
    parts.append(Text.assemble("overall: ", (report.status.upper(), _STYLE[report.status]),
                               f" (exit code {exit_code(report)}, {report.seconds:.1f}s)"))
    return Group(*parts)
