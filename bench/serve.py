"""Serving throughput: llama-server (slots, continuous batching) against the python backend
(llama-cpp-python's server), one run, the same Q4_K_M bench model, the same launcher.

Each backend is started through serving.launch.temp_server (the CPU mode the runtime decided, the
readiness probe); then, in each round, N concurrent streaming clients each send R chat requests to
one backend and then the other (order alternating between rounds). Reported per
backend: aggregate completion tokens/s over the whole wave, p50/p95 request latency and time to
first token, and whether every request succeeded; then the ratio llama-server / python.

    .venv/bin/python bench/serve.py [--params 350e6] [--clients 8] [--rounds 4] [--max-tokens 64] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loradeploy.config import config_from_dict  # noqa: E402
from loradeploy.fsutil import atomic_output  # noqa: E402
from loradeploy.serving.launch import temp_server  # noqa: E402
from loradeploy.tools.openai_http import Client  # noqa: E402

BACKENDS = ("llama-server", "python")
PROMPTS = ["Tell me about rivers.", "List some colours.", "Describe a quiet morning.", "Count to twenty.",
           "Name a few trees.", "What is a lantern?", "Write about stones.", "Explain the tides."]


def bench_gguf(workdir: Path, params: float, threads: int, con: Console) -> Path:
    """The bench model (demo.bench_models) as Q4_K_M, built once under ``workdir``."""
    from loradeploy.demo import build_bench_llama
    from loradeploy.tools.converter import convert
    from loradeploy.config import QUANT_TYPES
    from loradeploy.tools.llama_quantize import quantize

    tag = f"{params / 1e6:.0f}M"
    q4 = workdir / f"bench-{tag}-Q4_K_M.gguf"
    if q4.is_file():
        return q4
    with con.status(f"building the {tag} bench model (once)"):
        base = build_bench_llama(workdir / f"bench-base-{tag}", target_params=int(params))
    f16 = workdir / f"bench-{tag}-F16.gguf"
    if not f16.is_file():
        with con.status("converting to F16 GGUF (once)"), atomic_output(f16) as tmp:
            convert(base, tmp, outtype="f16", log_path=workdir / "build.log")
    with con.status("quantizing to Q4_K_M (once)"), atomic_output(q4) as tmp:
        rc = quantize(str(f16), str(tmp), QUANT_TYPES["Q4_K_M"], nthread=threads)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize returned {rc}")
    return q4


def _config(workdir: Path, backend: str, parallel: int, threads: int, n_ctx: int):
    return config_from_dict({
        "models": {"bench": {"base_model": str(workdir / "base"), "adapter": str(workdir / "adapter"), "port": 5998}},
        "deployment": {"llamacpp": {"backend": backend, "parallel": parallel, "threads": threads, "n_ctx": n_ctx,
                                    "startup_timeout_s": 300}},
        "pipeline": {"state_dir": str(workdir / "state"), "work_dir": str(workdir / "work")},
        "logging": {"log_dir": str(workdir / "logs")}})


def one_request(client: Client, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, chunks, usage = None, 0, None
    try:
        with client.stream_chat(body, timeout=900) as stream:
            for event in stream:
                if isinstance(event.get("usage"), dict) and event["usage"].get("completion_tokens") is not None:
                    usage = int(event["usage"]["completion_tokens"])
                for ch in event.get("choices") or []:
                    if (ch.get("delta") or {}).get("content"):
                        first = first if first is not None else time.perf_counter()
                        chunks += 1
            ok = stream.done
    except Exception as exc:  # a failed request is a result here, not a crash of the bench
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300], "latency_s": time.perf_counter() - t0}
    return {"ok": ok, "latency_s": time.perf_counter() - t0, "ttft_s": None if first is None else first - t0,
            "tokens": usage if usage is not None else chunks, "counted": "usage" if usage is not None else "chunks"}


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))] if values else 0.0


def wave(url: str, clients: int, requests: int, max_tokens: int, tag: str) -> list[dict]:
    """``clients`` threads, each sending ``requests`` streamed chats back to back, all started together;
    every result carries the wave's wall time."""
    client = Client(url, timeout=900)
    results: list[dict] = []
    lock = threading.Lock()
    go = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        go.wait()
        for r in range(requests):
            res = one_request(client, f"{PROMPTS[(i + r) % len(PROMPTS)]} ({tag}, client {i}, request {r})",
                              max_tokens)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return [{**r, "wave_s": wall} for r in results]


def summary(results: list[dict], walls: list[float]) -> dict:
    done = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in done)
    lat = [r["latency_s"] for r in done]
    ttft = [r["ttft_s"] for r in done if r.get("ttft_s") is not None]
    wall = sum(walls)
    return {"requests": len(results), "succeeded": len(done), "all_succeeded": len(done) == len(results),
            "errors": [r["error"] for r in results if not r["ok"] and "error" in r][:5],
            "wall_s": round(wall, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "latency_p50_s": round(_pct(lat, 0.5), 3), "latency_p95_s": round(_pct(lat, 0.95), 3),
            "ttft_p50_s": round(_pct(ttft, 0.5), 3), "ttft_p95_s": round(_pct(ttft, 0.95), 3),
            "tokens_counted_by": sorted({r["counted"] for r in done})}


def run_all(workdir: Path, gguf: Path, a, con: Console) -> tuple[dict, list[float]]:
    """Both backends up at once (idle while the other is measured), then ``rounds`` rounds of one
    wave each, in alternating order: load from other processes on the machine drifts, and each
    round's ratio compares two waves run back to back."""
    results: dict = {b: [] for b in BACKENDS}
    walls: dict = {b: [] for b in BACKENDS}
    meta, urls, ratios = {}, {}, []
    with contextlib.ExitStack() as stack:
        for backend in BACKENDS:
            cfg = _config(workdir, backend, a.parallel, a.threads, a.n_ctx)
            log = workdir / "logs" / f"{backend}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            with con.status(f"starting {backend}"):
                srv = stack.enter_context(temp_server(cfg, gguf, "bench", log))
            meta[backend] = {"ready_s": round(time.monotonic() - t0, 2), "cpu_mode": srv.runtime.get("describe"),
                             "slots": a.parallel if backend == "llama-server" else 1}
            urls[backend] = srv.url
            one_request(Client(srv.url), "warm up", 4)  # first-request costs out of the measurement
        for rnd in range(a.rounds):
            rates = {}
            for backend in (BACKENDS if rnd % 2 == 0 else BACKENDS[::-1]):
                with con.status(f"round {rnd + 1}/{a.rounds}: {backend}, {a.clients} clients x {a.requests} "
                                f"streamed requests of {a.max_tokens} tokens"):
                    got = wave(urls[backend], a.clients, a.requests, a.max_tokens, f"round {rnd}")
                results[backend] += got
                walls[backend].append(got[0]["wave_s"])
                rates[backend] = sum(r["tokens"] for r in got if r["ok"]) / got[0]["wave_s"]
            ratios.append(round(rates["llama-server"] / max(1e-9, rates["python"]), 2))
    rows = {b: {**summary(results[b], walls[b]), **meta[b]} for b in BACKENDS}
    return rows, ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=350e6, help="bench model size (demo.bench_models)")
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out" / "serve")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1, help="requests per client per round")
    ap.add_argument("--rounds", type=int, default=4, help="rounds; each measures both backends, order alternating")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=0, help="llama-server slots (default: one per client)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table on stderr)")
    a = ap.parse_args()
    a.parallel = a.parallel or a.clients
    con = Console(stderr=a.json)
    a.workdir.mkdir(parents=True, exist_ok=True)
    gguf = bench_gguf(a.workdir, a.params, a.threads, con)
    rows, ratios = run_all(a.workdir, gguf, a, con)
    ratio = rows["llama-server"]["tokens_per_s"] / max(1e-9, rows["python"]["tokens_per_s"])
    t = Table(title=f"serving {gguf.name} ({a.clients} concurrent streaming clients, {a.threads} threads)",
              min_width=100)
    for c in ("backend", "slots", "requests ok", "tokens", "wall s", "tokens/s", "p50 s", "p95 s", "TTFT p95 s"):
        t.add_column(c, justify="right")
    for name, r in rows.items():
        t.add_row(name, str(r["slots"]), f"{r['succeeded']}/{r['requests']}", str(r["completion_tokens"]),
                  f"{r['wall_s']:.1f}", f"{r['tokens_per_s']:.1f}", f"{r['latency_p50_s']:.2f}",
                  f"{r['latency_p95_s']:.2f}", f"{r['ttft_p95_s']:.2f}")
    t.add_row("ratio", "", "", "", "", f"{ratio:.2f}x", "", "", "")
    con.print(t)
    con.print(f"per-round ratios: {ratios}")
    con.print(f"CPU mode: {rows['llama-server']['cpu_mode']}; target: llama-server ≥ 3x the python backend")
    if a.json:
        print(json.dumps({"model": str(gguf), "params": a.params, "clients": a.clients,
                          "requests_per_client": a.requests, "max_tokens": a.max_tokens, "threads": a.threads,
                          "load_average": os.getloadavg(), "baseline": "python", "ours": "llama-server",
                          "rounds": a.rounds, "backends": rows, "ratio_tokens_per_s": round(ratio, 2),
                          "ratio_per_round": ratios, "target_ratio": 3.0,
                          "all_succeeded": all(r["all_succeeded"] for r in rows.values())}, indent=2))


if __name__ == "__main__":
    main()
