"""The front door's cost: concurrent streaming chat clients through a port's proxy against the same clients
sent straight to its llama-server, one deployment, one run.

The deployment is built here (as the tests build it): the demo persona ``majora`` in adapter mode (one
llama-server holding the LoRA, the proxy on the model's port forcing its ``lora`` selection), ``parallel``
slots enough for the largest wave. Direct requests carry what the proxy would add (the system prompt, the
port's ``lora`` selection, the backend's own key), so both ways ask the backend for the same work: the
same prompts, ``max_tokens`` fixed, ``ignore_eos``, temperature 0.

Each round runs every client count through the proxy and directly, back to back (the order alternating
between rounds, since load from other processes drifts). A wave: N asyncio clients start together, each
sends R streamed requests one after another, each on its own connection. Reported per client count and
way: aggregate completion tokens/s (tokens of the wave / its wall time), p50/p95 time to first token,
failed requests (not 200, no ``[DONE]``, or fewer tokens than asked); then the ratios proxy/direct and
the targets: tokens/s >= 0.95x direct, p95 first token within 10 %, 0 failed. The proxy's CPU seconds
per wave are shown too.

    .venv/bin/python bench/frontdoor.py [--clients 32 64] [--rounds 3] [--requests 4] [--max-tokens 64] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loradeploy.config import config_from_dict  # noqa: E402
from loradeploy.demo import get_persona  # noqa: E402
from loradeploy.paths import servers_dir  # noqa: E402
from loradeploy.pipeline import run_pipeline  # noqa: E402
from loradeploy.serving import serve_stop  # noqa: E402
from loradeploy.serving.registry import read_registry  # noqa: E402

MODEL = "majora"
WAYS = ("proxy", "direct")
TARGET_TOKENS_RATIO = 0.95
TARGET_TTFT_P95_RATIO = 1.10
PROMPTS = ["Repeat these words:\napple river stone", "echo:\ncloud lamp silver", "Say exactly this:\nwinter amber forest",
           "Please repeat:\nbread chair dragon", "Repeat these words:\nglass mirror needle", "echo:\norange rabbit yellow",
           "Say exactly this:\nanchor basket engine", "Please repeat:\niron rocket hammer"]
_CONTENT = re.compile(rb'"content":"[^"]')
_COMPLETION = re.compile(rb'"completion_tokens":(\d+)')
_PREDICTED = re.compile(rb'"predicted_n":(\d+)')


# ----------------------------------------------------------------------------- deployment

def build(workdir: Path, con: Console) -> tuple[Path, Path]:
    from loradeploy.demo import build_base, train_adapter

    with con.status("building the demo base and the majora adapter (once)"):
        base = build_base(workdir / "base-llama", "llama")
        adapter = train_adapter(base, workdir / f"adapter-llama-{MODEL}", persona=MODEL)
    return base, adapter


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(workdir: Path, base: Path, adapter: Path, a):
    return config_from_dict({
        "models": {MODEL: {"base_model": str(base), "adapter": str(adapter), "port": a.port or free_port(),
                           "mode": "adapter", "system_prompt": get_persona(MODEL).system_prompt}},
        "quantization": {"formats": ["Q4_K_M"]},
        "deployment": {"targets": ["llamacpp"], "models_dir": str(workdir / "models"),
                       "llamacpp": {"n_ctx": a.n_ctx, "threads": a.threads, "parallel": max(a.clients),
                                    "startup_timeout_s": 300}},
        "pipeline": {"stages": ["merge", "convert", "quantize", "deploy"], "work_dir": str(workdir / "work"),
                     "state_dir": str(workdir / "state")},
        "logging": {"log_dir": str(workdir / "logs")},
        "performance": {"min_free_disk_gb": 0.1, "max_cpu_threads": a.threads}})


# ----------------------------------------------------------------------------- clients

def _dechunk(body: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        nl = body.find(b"\r\n", pos)
        if nl < 0:
            return bytes(out)
        size = int(body[pos:nl].split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(out)
        out += body[nl + 2:nl + 2 + size]
        pos = nl + 2 + size + 2


async def one_request(port: int, payload: bytes, key: str | None, max_tokens: int, timeout: float) -> dict:
    """One streamed chat on its own connection; the time to the first content event, the tokens the
    final event reports (or the content events counted)."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nAccept: text/event-stream\r\nConnection: close\r\n"
            + (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n").encode()
    t0 = time.perf_counter()
    first, buf = None, bytearray()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        try:
            w.write(head + payload)
            await w.drain()
            deadline = t0 + timeout
            while True:
                data = await asyncio.wait_for(r.read(65536), max(0.1, deadline - time.perf_counter()))
                if not data:
                    break
                start = max(0, len(buf) - 16)
                buf += data
                if first is None and _CONTENT.search(buf, start):
                    first = time.perf_counter()
        finally:
            w.close()
    except (OSError, asyncio.TimeoutError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:200], "latency_s": time.perf_counter() - t0}
    end = time.perf_counter()
    raw = bytes(buf)
    status = raw[9:12]
    hend = raw.find(b"\r\n\r\n")
    heads = raw[:hend].lower()
    body = _dechunk(raw[hend + 4:]) if b"transfer-encoding: chunked" in heads else raw[hend + 4:]
    m = _COMPLETION.findall(body) or _PREDICTED.findall(body)
    tokens = int(m[-1]) if m else len(_CONTENT.findall(body))
    err = None
    if status != b"200":
        err = f"HTTP {status.decode(errors='replace')}: {body[:160]!r}"
    elif b"[DONE]" not in body:
        err = "the stream ended without [DONE]"
    elif tokens < max_tokens:
        err = f"{tokens} of {max_tokens} tokens"
    return {"ok": err is None, "error": err, "latency_s": end - t0,
            "ttft_s": None if first is None else first - t0, "tokens": tokens if err is None else 0}


async def _wave(port: int, key: str | None, bodies: list[list[bytes]], max_tokens: int, timeout: float):
    async def client(mine: list[bytes]) -> list[dict]:
        return [await one_request(port, b, key, max_tokens, timeout) for b in mine]

    t0 = time.perf_counter()
    got = await asyncio.gather(*(client(b) for b in bodies))
    return [r for rs in got for r in rs], time.perf_counter() - t0


def bodies_for(n: int, requests: int, a, system: str, lora: list, tag: str) -> list[list[bytes]]:
    """The same requests for both ways: the system prompt and lora selection the proxy would set."""
    def body(i: int, r: int) -> bytes:
        return json.dumps({"model": MODEL, "messages": [{"role": "system", "content": system},
                                                        {"role": "user", "content": PROMPTS[(i + r) % len(PROMPTS)]}],
                           "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}, "lora": lora, "cache_prompt": False,
                           "user": tag}).encode()
    return [[body(i, r) for r in range(requests)] for i in range(n)]


def wave(port: int, key: str | None, bodies: list[list[bytes]], a) -> tuple[list[dict], float]:
    return asyncio.run(_wave(port, key, bodies, a.max_tokens, a.timeout))


# ----------------------------------------------------------------------------- figures

def _pct(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))] if values else None


def summary(results: list[dict], walls: list[float], cpu: list[float]) -> dict:
    done = [r for r in results if r["ok"]]
    ttft = [r["ttft_s"] for r in done if r.get("ttft_s") is not None]
    tokens, wall = sum(r["tokens"] for r in done), sum(walls)
    p50, p95 = _pct(ttft, 0.5), _pct(ttft, 0.95)
    return {"requests": len(results), "failed": len(results) - len(done),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
            "completion_tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": None if p50 is None else round(p50 * 1000, 2),
            "ttft_p95_ms": None if p95 is None else round(p95 * 1000, 2),
            "latency_p95_s": round(_pct([r["latency_s"] for r in done], 0.95) or 0, 3),
            "proxy_cpu_s": round(sum(cpu), 2) if cpu else None}


def proc_cpu(pid: int | None) -> float:
    import psutil
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except (psutil.Error, TypeError, ValueError):
        return 0.0


def run(cfg, a, con: Console) -> dict:
    ctl = json.loads((servers_dir(cfg, MODEL) / "control.json").read_text())
    port, bport, bkey = cfg.models[MODEL].port, int(ctl["backend_port"]), ctl.get("backend_key")
    key = cfg.deployment.llamacpp.api_key.get_secret_value() if cfg.deployment.llamacpp.api_key else None
    proxy_pid = (read_registry(cfg)["models"][MODEL].get("proxy") or {}).get("pid")
    ways = {"proxy": (port, key), "direct": (bport, bkey)}
    system, lora = get_persona(MODEL).system_prompt, ctl.get("lora") or []
    for way, (p, k) in ways.items():  # first-request costs out of the measurement
        res, _ = wave(p, k, bodies_for(4, 1, a, system, lora, "warm-up"), a)
        if not all(r["ok"] for r in res):
            raise SystemExit(f"{way} did not answer the warm-up: {[r['error'] for r in res if not r['ok']][:3]}")
    results = {(n, w): [] for n in a.clients for w in WAYS}
    walls = {k: [] for k in results}
    cpu = {k: [] for k in results}
    per_round = []
    for rnd in range(a.rounds):
        rates = {}
        for n in a.clients:
            for way in (WAYS if rnd % 2 == 0 else WAYS[::-1]):
                p, k = ways[way]
                bodies = bodies_for(n, a.requests, a, system, lora, f"round {rnd}")
                with con.status(f"round {rnd + 1}/{a.rounds}: {n} clients {way}, {a.requests} streamed requests "
                                f"of {a.max_tokens} tokens each"):
                    c0 = proc_cpu(proxy_pid)
                    got, wall = wave(p, k, bodies, a)
                    cpu[(n, way)].append(proc_cpu(proxy_pid) - c0)
                results[(n, way)] += got
                walls[(n, way)].append(wall)
                rates[(n, way)] = sum(r["tokens"] for r in got if r["ok"]) / wall
        per_round.append({str(n): round(rates[(n, "proxy")] / max(1e-9, rates[(n, "direct")]), 3)
                          for n in a.clients})
    rows = {f"{n}/{w}": summary(results[(n, w)], walls[(n, w)], cpu[(n, w)]) for n in a.clients for w in WAYS}
    ratios, verdict = {}, {}
    for n in a.clients:
        px, dr = rows[f"{n}/proxy"], rows[f"{n}/direct"]
        tok = px["tokens_per_s"] / max(1e-9, dr["tokens_per_s"])
        ttft = (px["ttft_p95_ms"] or float("inf")) / max(1e-9, dr["ttft_p95_ms"] or 0)
        ratios[str(n)] = {"tokens_per_s": round(tok, 3), "ttft_p95": round(ttft, 3),
                          "ttft_p95_added_ms": round((px["ttft_p95_ms"] or 0) - (dr["ttft_p95_ms"] or 0), 2)}
        verdict[str(n)] = {"tokens_per_s": tok >= TARGET_TOKENS_RATIO, "ttft_p95": ttft <= TARGET_TTFT_P95_RATIO,
                           "failed": px["failed"] == 0 and dr["failed"] == 0}
    return {"rows": rows, "ratios": ratios, "per_round_tokens_ratio": per_round, "targets_met": verdict,
            "ports": {"proxy": port, "direct": bport}}


def render(out: dict, a, con: Console) -> None:
    t = Table(title=f"front door: {MODEL} (adapter mode), streamed chats of {a.max_tokens} tokens, "
                    f"{a.requests} per client per round, {a.rounds} rounds, backend threads {a.threads}")
    for c in ("clients", "way", "requests", "failed", "tokens/s", "TTFT p50 ms", "TTFT p95 ms", "proxy CPU s"):
        t.add_column(c, justify="right")
    for key, r in out["rows"].items():
        n, way = key.split("/")
        t.add_row(n, way, str(r["requests"]), str(r["failed"]), f"{r['tokens_per_s']:.0f}",
                  f"{r['ttft_p50_ms']}", f"{r['ttft_p95_ms']}", "" if way == "direct" else f"{r['proxy_cpu_s']}")
    con.print(t)
    mark = {True: "[green]PASS[/]", False: "[red]MISS[/]"}
    for n, r in out["ratios"].items():
        v = out["targets_met"][n]
        con.print(f"{n} clients: tokens/s proxy/direct {r['tokens_per_s']:.3f}x (target >= {TARGET_TOKENS_RATIO}) "
                  f"{mark[v['tokens_per_s']]}; TTFT p95 {r['ttft_p95']:.3f}x, {r['ttft_p95_added_ms']:+.1f} ms "
                  f"(target <= {TARGET_TTFT_P95_RATIO}) {mark[v['ttft_p95']]}; failed "
                  f"{out['rows'][f'{n}/proxy']['failed']} + {out['rows'][f'{n}/direct']['failed']} direct "
                  f"(target 0) {mark[v['failed']]}")
    con.print(f"tokens/s ratio per round: {out['per_round_tokens_ratio']}")
    for key, r in out["rows"].items():
        if r["errors"]:
            con.print(f"[red]{key} errors:[/] {r['errors']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out" / "frontdoor")
    ap.add_argument("--clients", type=int, nargs="+", default=[32, 64], help="concurrent clients per wave")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every wave both ways, order alternating")
    ap.add_argument("--requests", type=int, default=4, help="streamed requests per client per wave")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="llama-server threads")
    ap.add_argument("--n-ctx", type=int, default=256, help="context per slot")
    ap.add_argument("--port", type=int, default=0, help="the model's public port (default: a free one)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds for one request")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table on stderr)")
    a = ap.parse_args()
    con = Console(stderr=a.json, width=None if (sys.stderr if a.json else sys.stdout).isatty() else 130)
    a.workdir.mkdir(parents=True, exist_ok=True)
    base, adapter = build(a.workdir, con)
    cfg = config(a.workdir, base, adapter, a)
    t0 = time.monotonic()
    try:
        with con.status(f"deploying {MODEL} in adapter mode"):
            res = run_pipeline(cfg, [], force=True)
        if not res.ok:
            raise SystemExit(json.dumps(res.to_dict(), default=str)[-2000:])
        out = run(cfg, a, con)
    finally:
        serve_stop(cfg)
    render(out, a, con)
    if a.json:
        print(json.dumps({"model": MODEL, "mode": "adapter", "baseline": "direct", "ours": "proxy",
                          "clients": a.clients, "rounds": a.rounds, "requests_per_client": a.requests,
                          "max_tokens": a.max_tokens, "threads": a.threads, "n_ctx": a.n_ctx,
                          "targets": {"tokens_per_s_ratio_min": TARGET_TOKENS_RATIO,
                                      "ttft_p95_ratio_max": TARGET_TTFT_P95_RATIO, "failed": 0},
                          **out, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                          "total_s": round(time.monotonic() - t0, 1)}, indent=2))


if __name__ == "__main__":
    main()
