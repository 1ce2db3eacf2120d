"""The served API: the port, /v1/models, a real chat completion, and its latency and tokens/s;
with llama-server behind the port, also its own /health and /metrics.

Every request goes through the one OpenAI-compatible client with ``health_check.timeout_s`` as a
deadline on the whole request, not just each socket read, so a hung or trickling server turns
into a failed check instead of a hung health command.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence
from urllib.parse import urlsplit

from ..errors import HttpError, HttpStatusError, HttpTimeout
from ..tools.openai_http import Client
from .results import FAIL, PASS, WARN, Check, EndpointLike, restart_hint

if TYPE_CHECKING:
    from ..config import HealthCheckConfig

_CONNECT_CAP_S = 5.0         # a loopback connect that takes longer will not get better


def client_for(endpoint: EndpointLike, api_key: Optional[str] = None) -> Client:
    """A client for the endpoint; a base_url without a port means the endpoint's recorded port."""
    u = urlsplit(endpoint.base_url if "://" in endpoint.base_url else f"http://{endpoint.base_url}")
    host = u.hostname or "127.0.0.1"
    port = u.port or endpoint.port or (443 if u.scheme == "https" else 80)
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Client(f"{u.scheme or 'http'}://{netloc}{u.path}", api_key=api_key)


def port_check(client: Client, endpoint: EndpointLike, hc: "HealthCheckConfig") -> Check:
    # A bare TCP connect, apart from any HTTP: "nothing listens" and "listens but does not answer"
    # need different remedies.
    timeout = min(hc.timeout_s, _CONNECT_CAP_S)
    t0 = time.monotonic()
    try:
        with socket.create_connection((client.host, client.port), timeout=timeout):
            pass
    except socket.timeout:
        return Check("api.port", FAIL, f"connecting to {client.where} timed out after {timeout:g}s",
                     "check the host/port and any firewall; " + restart_hint(endpoint))
    except OSError as exc:
        why = "connection refused: nothing listens there" if isinstance(exc, ConnectionRefusedError) \
            else (exc.strerror or str(exc))
        return Check("api.port", FAIL, f"{client.where}: {why}", restart_hint(endpoint))
    ms = (time.monotonic() - t0) * 1000
    return Check("api.port", PASS, f"{client.where} accepts connections", metrics={"connect_ms": round(ms, 2)})


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


def models_check(client: Client, endpoint: EndpointLike,
                 hc: "HealthCheckConfig") -> tuple[Check, Optional[str]]:
    """api.models, and the id the server lists the endpoint's model under (None when it does not)."""
    try:
        resp = client.get("/v1/models", timeout=hc.timeout_s, check=True)
    except HttpTimeout as exc:
        return Check("api.models", FAIL, f"{exc.message}: the server is hung or overloaded",
                     "restart the server; " + restart_hint(endpoint)), None
    except HttpStatusError as exc:
        return Check("api.models", FAIL, exc.message, "read the server log; " + restart_hint(endpoint),
                     {"http_status": exc.status}), None
    except HttpError as exc:
        return Check("api.models", FAIL, f"GET /v1/models on {client.where} failed: {exc.message}",
                     "is this an OpenAI-compatible server? " + restart_hint(endpoint)), None
    if isinstance(resp.data, str):
        return Check("api.models", FAIL, f"GET /v1/models on {client.where} answered something that is not "
                                         f"JSON: {resp.data[:120]!r}",
                     "is this an OpenAI-compatible server? " + restart_hint(endpoint)), None
    secs = resp.seconds
    entries = resp.data.get("data") if isinstance(resp.data, dict) else None
    ids = [str(e.get("id")) for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    found = _listed_id(ids, endpoint)
    metrics = {"response_s": round(secs, 4), "models": ids[:10]}
    if found is None:
        return Check("api.models", FAIL, f"{client.where} serves {ids or 'no models'}, not {endpoint.model}",
                     f"another server holds port {client.port}, or the model failed to load; "
                     + restart_hint(endpoint), metrics), None
    if secs > hc.max_latency_s:
        return Check("api.models", WARN, f"{found} listed, but /v1/models took {secs:.2f}s "
                                         f"(over {hc.max_latency_s:g}s)",
                     "the server is overloaded: check CPU/GPU load", metrics), found
    return Check("api.models", PASS, f"{found} loaded; /v1/models answered in {secs * 1000:.0f} ms",
                 metrics=metrics), found


# ----------------------------------------------------------------------------- model test

@dataclass
class Completion:
    text: str = ""
    finish_reason: Optional[str] = None
    latency_s: float = 0.0
    ttft_s: Optional[float] = None
    tokens: int = 0
    tokens_per_s: Optional[float] = None


def _as_chunk(answer: dict) -> dict:
    """An unstreamed chat completion in the shape of one stream chunk."""
    choices = [{"delta": {"content": (c.get("message") or {}).get("content")},
                "finish_reason": c.get("finish_reason")} for c in answer.get("choices") or []]
    return {"choices": choices, "usage": answer.get("usage")}


def complete(client: Client, model_id: str, prompt: str, hc: "HealthCheckConfig") -> Completion:
    """One streamed chat completion, timed from the caller's side."""
    body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": hc.max_tokens,
            "temperature": 0, "stream_options": {"include_usage": True}}
    out = Completion()
    parts: list[str] = []
    first = last = None
    usage_tokens = None
    with client.stream_chat(body, timeout=hc.timeout_s) as stream:
        t0 = stream.opened_at
        for event in stream:
            if not stream.streamed:
                event = _as_chunk(event)
            if event.get("error"):
                raise HttpError(f"the server reported an error mid-stream: {str(event['error'])[:300]}",
                                kind="protocol")
            if isinstance(event.get("usage"), dict) and event["usage"].get("completion_tokens") is not None:
                usage_tokens = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    parts.append(content)
                if choice.get("finish_reason"):
                    out.finish_reason = choice["finish_reason"]
        if not stream.done and out.finish_reason is None:
            raise HttpError(f"the stream ended after {len(parts)} token(s) with no finish_reason: the server "
                            "closed the connection mid-answer (did it crash?)", kind="protocol")
        streamed = stream.streamed
    end = time.perf_counter()
    out.text = "".join(parts)
    out.latency_s = end - t0
    out.tokens = usage_tokens if usage_tokens is not None else len(parts)
    if first is not None and not streamed:
        # One JSON answer: no time to first token, only the overall rate.
        out.tokens_per_s = out.tokens / out.latency_s if out.latency_s > 0 else None
    elif first is not None:
        out.ttft_s = first - t0
        # Decode rate after the first token; prompt processing is what TTFT measures.
        if out.tokens >= 2 and last > first:
            out.tokens_per_s = (out.tokens - 1) / (last - first)
        else:
            out.tokens_per_s = out.tokens / out.latency_s if out.latency_s > 0 else None
    return out


def completion_check(name: str, client: Client, endpoint: EndpointLike, model_id: str, prompt: str,
                     hc: "HealthCheckConfig") -> tuple[Check, Optional[Completion]]:
    short = prompt if len(prompt) <= 40 else prompt[:37] + "..."
    try:
        c = complete(client, model_id, prompt, hc)
    except HttpTimeout as exc:
        return Check(name, FAIL, f"chat completion for {short!r}: {exc.message}",
                     f"the server is hung or far too slow: restart it, or raise health_check.timeout_s "
                     f"({hc.timeout_s:g}s)"), None
    except HttpStatusError as exc:
        return Check(name, FAIL, f"chat completion: {exc.message}",
                     "read the server log; " + restart_hint(endpoint), {"http_status": exc.status}), None
    except HttpError as exc:
        return Check(name, FAIL, f"chat completion failed: {exc.message}", restart_hint(endpoint)), None
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


def performance_check(done: list[Completion], hc: "HealthCheckConfig") -> Check:
    """Worst latency, TTFT and tokens/s over the prompts that got an answer."""
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


# ----------------------------------------------------------------------------- llama-server's own view

_METRICS = ("requests_processing", "requests_deferred", "tokens_predicted_total", "prompt_tokens_total",
            "predicted_tokens_seconds", "n_busy_slots_per_decode")


def prometheus_values(text: str, prefix: str = "llamacpp:") -> dict[str, float]:
    """``llamacpp:name value`` lines of a Prometheus text exposition (labels and comments skipped)."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.strip().partition(" ")
        if name.startswith(prefix) and "{" not in name:
            try:
                out[name[len(prefix):]] = float(value.split()[0])
            except (ValueError, IndexError):
                continue
    return out


def server_checks(client: Client, endpoint: EndpointLike, hc: "HealthCheckConfig") -> list[Check]:
    """llama-server's ``/health`` and ``/metrics`` (slots at work, requests waiting for one, tokens);
    nothing when the port does not answer them the llama-server way (the python backend)."""
    try:
        health = client.get("/health", timeout=hc.timeout_s)
    except HttpError:
        return []
    if not isinstance(health.data, dict) or ("status" not in health.data and "error" not in health.data):
        return []
    if not health.ok:
        return [Check("api.server", FAIL, f"llama-server /health answered HTTP {health.status}: "
                                          f"{str(health.data)[:200]}", restart_hint(endpoint))]
    metrics: dict = {"health": health.data.get("status")}
    try:
        resp = client.get("/metrics", timeout=hc.timeout_s)
        if resp.ok and isinstance(resp.data, str):
            values = prometheus_values(resp.data)
            metrics.update({k: values[k] for k in _METRICS if k in values})
    except HttpError:
        pass  # /health said ok: missing numbers are no reason to call the server unwell
    detail = (f"llama-server ok; {metrics.get('requests_processing', 0):g} request(s) decoding, "
              f"{metrics.get('requests_deferred', 0):g} waiting for a slot")
    if metrics.get("requests_deferred", 0) > 0:
        return [Check("api.server", WARN, detail + ": every slot is busy",
                      "raise deployment.llamacpp.parallel, or spread the load", metrics)]
    return [Check("api.server", PASS, detail, metrics=metrics)]


def model_checks(endpoint: EndpointLike, hc: "HealthCheckConfig", model_id: str, prompts: Sequence[str],
                 *, api_key: Optional[str] = None, client: Optional[Client] = None) -> list[Check]:
    """One completion check per prompt, then the performance over those that answered."""
    client = client or client_for(endpoint, api_key)
    checks, done = [], []
    for i, prompt in enumerate(prompts):
        name = "model.completion" if len(prompts) == 1 else f"model.completion[{i}]"
        check, c = completion_check(name, client, endpoint, model_id, prompt, hc)
        checks.append(check)
        if c is not None and c.text.strip():
            done.append(c)
    if done:
        checks.append(performance_check(done, hc))
    checks.extend(server_checks(client, endpoint, hc))  # after the completions: /metrics then counts them
    return checks
