"""Adapter mode against merged, one run, the real pipeline: three random rank-16 LoRAs on one bench
base served in adapter mode (one quantized base, one llama-server holding the three LoRA GGUFs, a
port each), beside one of them merged and served on its own (the baseline: what merged mode costs
per persona).

Reported: serving RSS (the server process tree, after a warm-up request on every port) of the shared
server for three personas against one merged model's (target <= 1.3x), disk per persona, pipeline
seconds per model in each mode (the second and third adapters reuse the base's quantization), and a
v2 of one adapter deployed while streaming clients keep every port busy (failed requests, target 0).

    .venv/bin/python bench/adapter_mode.py [--params 100e6] [--clients 2] [--json]
"""
from __future__ import annotations

import argparse
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
from loradeploy.pipeline import run_pipeline  # noqa: E402
from loradeploy.serving import serve_stop  # noqa: E402
from loradeploy.serving.registry import read_registry  # noqa: E402
from loradeploy.tools.openai_http import Client  # noqa: E402
from loradeploy.tools.procmem import proc_tree_rss  # noqa: E402

ADAPTERS = ("p0", "p1", "p2")
TARGET_RSS_RATIO = 1.3
MIB = 2**20


def build(workdir: Path, params: float, con: Console) -> tuple[Path, dict[str, Path]]:
    from loradeploy.demo import build_bench_adapter, build_bench_llama

    tag = f"{params / 1e6:.0f}M"
    with con.status(f"building the {tag} bench base and four adapters (once)"):
        base = build_bench_llama(workdir / f"base-{tag}", target_params=int(params))
        adapters = {f"s{seed}": build_bench_adapter(base, workdir / f"adapter-{tag}-s{seed}", seed=seed)
                    for seed in range(4)}
    return base, adapters


def config(workdir: Path, base: Path, adapters: dict[str, Path], *, threads: int, v2: bool = False):
    port0 = 26000 + os.getpid() % 2000
    models = {"merged": {"base_model": str(base), "adapter": str(adapters["s0"]), "port": port0, "mode": "merged"}}
    for i, m in enumerate(ADAPTERS):
        src = "s3" if v2 and m == "p1" else f"s{i}"
        models[m] = {"base_model": str(base), "adapter": str(adapters[src]), "port": port0 + 1 + i,
                     "mode": "adapter", "version": "v2" if v2 and m == "p1" else "v1",
                     "system_prompt": f"You are {m}."}
    return config_from_dict({
        "models": models, "quantization": {"formats": ["Q4_K_M"]},
        "deployment": {"targets": ["llamacpp"], "models_dir": str(workdir / "models"),
                       "llamacpp": {"n_ctx": 512, "parallel": 2, "threads": threads, "startup_timeout_s": 300}},
        "pipeline": {"stages": ["merge", "convert", "quantize", "deploy"], "work_dir": str(workdir / "work"),
                     "state_dir": str(workdir / "state")},
        "logging": {"log_dir": str(workdir / "logs")},
        "performance": {"min_free_disk_gb": 0.5, "max_cpu_threads": threads}})


def warm(cfg, names) -> None:
    for m in names:
        r = Client(f"http://127.0.0.1:{cfg.models[m].port}", timeout=600).chat(
            {"messages": [{"role": "user", "content": "Tell me about rivers."}], "max_tokens": 16})
        if not r.ok:
            raise SystemExit(f"{m} did not answer: {r.status} {str(r.data)[:200]}")


def load(port: int, stop: threading.Event, out: dict) -> None:
    client = Client(f"http://127.0.0.1:{port}", timeout=600)
    while not stop.is_set():
        try:
            with client.stream_chat({"messages": [{"role": "user", "content": "Count to twenty."}],
                                     "max_tokens": 16}, timeout=600) as stream:
                for _ in stream:
                    pass
                ok = stream.done
        except Exception as exc:  # a failure is the result here
            ok, out.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}"[:200])
        out["ok" if ok else "failed"] = out.get("ok" if ok else "failed", 0) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out" / "adapter_mode")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clients", type=int, default=2, help="streaming clients per port during the v2 deploy")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    con = Console(stderr=a.json)
    a.workdir.mkdir(parents=True, exist_ok=True)
    base, adapters = build(a.workdir, a.params, con)
    cfg = config(a.workdir, base, adapters, threads=a.threads)
    try:
        t0 = time.monotonic()
        with con.status("pipeline: one merged model, three in adapter mode"):
            res = run_pipeline(cfg, [], force=True)
        if not res.ok:
            raise SystemExit(json.dumps(res.to_dict())[:2000])
        secs = {m: round(sum(s.seconds for s in mo.stages.values()), 2) for m, mo in res.models.items()}
        warm(cfg, cfg.models)
        reg = read_registry(cfg)
        merged_pid = reg["models"]["merged"]["backend"]["pid"]
        shared_pid = reg["models"]["p0"]["backend"]["pid"]
        rss_merged, rss_shared = proc_tree_rss(merged_pid), proc_tree_rss(shared_pid)
        disk = {m: os.path.getsize(reg["models"][m]["gguf"]) for m in cfg.models}
        base_disk = os.path.getsize(reg["models"]["p0"]["base_gguf"])

        # v2 of p1 under load on every adapter port
        stop, outs = threading.Event(), {m: {} for m in ADAPTERS}
        threads = [threading.Thread(target=load, args=(cfg.models[m].port, stop, outs[m]), daemon=True)
                   for m in ADAPTERS for _ in range(a.clients)]
        for t in threads:
            t.start()
        time.sleep(2)
        t1 = time.monotonic()
        with con.status("deploying p1 v2 while every adapter port streams"):
            res2 = run_pipeline(config(a.workdir, base, adapters, threads=a.threads, v2=True), ["p1"])
        v2_s = time.monotonic() - t1
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(timeout=600)
        failed = sum(o.get("failed", 0) for o in outs.values())
    finally:
        serve_stop(cfg)
    ratio = rss_shared / max(1, rss_merged)
    tab = Table(title=f"adapter mode vs merged ({a.params / 1e6:.0f}M bench base, Q4_K_M, rank-16 LoRAs)")
    for c in ("serving", "personas", "RSS MiB", "RSS per persona MiB", "disk per persona MiB"):
        tab.add_column(c, justify="right")
    tab.add_row("merged (own server)", "1", f"{rss_merged / MIB:.0f}", f"{rss_merged / MIB:.0f}",
                f"{disk['merged'] / MIB:.1f}")
    tab.add_row("adapter (one shared server)", "3", f"{rss_shared / MIB:.0f}", f"{rss_shared / 3 / MIB:.0f}",
                f"{(base_disk / 3 + disk['p0']) / MIB:.1f}")
    tab.add_row("ratio 3 adapters / 1 merged", "", f"{ratio:.2f}x", "", "")
    con.print(tab)
    con.print(f"pipeline seconds per model: {secs}; p1 v2 deploy {v2_s:.1f}s, "
              f"requests during it: { {m: o.get('ok', 0) for m, o in outs.items()} } ok, {failed} failed "
              f"(target 0); RSS target <= {TARGET_RSS_RATIO}x")
    if a.json:
        print(json.dumps({"params": a.params, "baseline": "merged", "ours": "adapter",
                          "rss_mib": {"merged_one": round(rss_merged / MIB, 1), "adapter_three": round(rss_shared / MIB, 1)},
                          "ratio_rss_three_adapters_to_one_merged": round(ratio, 3), "target_ratio": TARGET_RSS_RATIO,
                          "disk_mib": {m: round(v / MIB, 2) for m, v in disk.items()} | {"base": round(base_disk / MIB, 2)},
                          "pipeline_s": secs, "v2": {"ok": res2.ok, "seconds": round(v2_s, 2),
                                                     "requests": outs, "failed": failed},
                          "load_average": os.getloadavg(), "total_s": round(time.monotonic() - t0, 1)}, indent=2))


if __name__ == "__main__":
    main()
