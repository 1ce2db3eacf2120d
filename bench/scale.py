"""The Ray executor against the local one, same three-model plan, one process; and what the measured
per-stage costs project for a 16-adapter plan on 1, 4 and 16 nodes.

Baseline: `performance.executor: local` (heavy stages one model at a time, in this process).
Ours: `performance.executor: ray` on a Ray instance on this machine, every heavy stage a Ray task
asking for the CPUs of its thread plan (0 = a whole node's) and its estimated memory. With whole-node
requests Ray runs one task at a time here, as the local loop does, so the difference between the two
runs is what Ray costs: dispatch, worker processes, the driver re-hashing every artifact.

overhead_pct: (ours - baseline) / ours, the run's share spent on scheduling (target <= 10 %); the
per-task view (driver-observed seconds minus seconds on the node) is reported beside it. Starting the
Ray instance is reported apart (a cluster is started once, not per run).

projection: 16 adapters on the same base, each a chain of the measured stages, list-scheduled on N
nodes shaped like this machine (CPUs, Ray memory), each task reserving what it asked for here and
lasting what it took here plus the measured per-task overhead.

    .venv/bin/python bench/scale.py [--json] [--params 40e6] [--models 3] [--workdir bench/out]
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loradeploy.config import config_from_dict  # noqa: E402
from loradeploy.pipeline import run_pipeline  # noqa: E402

TARGETS = {"overhead_pct": 10.0}
STAGES = ["fetch", "merge", "convert", "quantize"]
HEAVY = ["merge", "convert", "quantize"]
FORMATS = ["Q4_K_M", "Q5_K_M", "Q8_0"]


def build_inputs(workdir: Path, params: float, n: int) -> tuple[Path, list[Path]]:
    from loradeploy.demo import build_bench_adapter, build_bench_llama
    base = build_bench_llama(workdir / "scale-base", target_params=int(params))
    return base, [build_bench_adapter(base, workdir / f"scale-adapter-{i}", seed=i) for i in range(n)]


def config(run: Path, base: Path, adapters: list[Path], executor: str):
    perf = {"min_free_disk_gb": 0.5, "executor": executor}
    return config_from_dict({
        "models": {f"m{i}": {"base_model": str(base), "adapter": str(a), "port": 5900 + i} for i, a in enumerate(adapters)},
        "quantization": {"formats": FORMATS},
        "pipeline": {"stages": STAGES, "work_dir": str(run / "work"), "state_dir": str(run / "state")},
        "logging": {"log_dir": str(run / "logs")}, "performance": perf})


def timed_run(cfg) -> tuple[float, object]:
    t0 = time.monotonic()
    res = run_pipeline(cfg, [])
    secs = time.monotonic() - t0
    if not res.ok:
        raise SystemExit(f"run failed: {json.dumps(res.to_dict())[:2000]}")
    return secs, res


def digests(res) -> dict:
    return {m: {a["format"]: a["sha256"] for a in mo.artifacts} for m, mo in res.models.items()}


def per_stage(res, ray_res) -> dict:
    """Per heavy stage: mean seconds and peak RSS (local run), what the Ray task asked for, its overhead."""
    out = {}
    for s in HEAVY:
        loc = [mo.stages[s] for mo in res.models.values()]
        rem = [mo.stages[s] for mo in ray_res.models.values()]
        req = rem[0].info["ray"]
        over = [o.info["ray"]["seconds_on_driver"] - o.info["ray"]["seconds_on_node"] for o in rem]
        out[s] = {"seconds": round(sum(o.seconds for o in loc) / len(loc), 3),
                  "peak_rss_mib": round(max(o.peak_rss_mib for o in loc), 1),
                  "seconds_on_node": round(sum(o.info["ray"]["seconds_on_node"] for o in rem) / len(rem), 3),
                  "num_cpus": req["num_cpus"], "memory_gib": req["memory_gib"],
                  "overhead_s": round(sum(over) / len(over), 3)}
    return out


def project(stages: dict, n_models: int, n_nodes: int, node_cpus: float, node_mem_gib: float) -> float:
    """Wall seconds of n_models chains (stages in order) list-scheduled on n_nodes identical nodes."""
    free = [[node_cpus, node_mem_gib] for _ in range(n_nodes)]
    nxt = {m: 0 for m in range(n_models)}      # index of each model's next stage
    ready = list(range(n_models))              # models whose next stage may start, in order
    events: list[tuple[float, int, int]] = []  # (end time, model, node)
    now = 0.0
    names = list(stages)
    while ready or events:
        placed = True
        while placed and ready:
            placed = False
            for m in list(ready):
                st = stages[names[nxt[m]]]
                cpu, mem = min(st["num_cpus"], node_cpus), st["memory_gib"]
                node = next((i for i, f in enumerate(free) if f[0] >= cpu and f[1] >= mem), None)
                if node is None:
                    continue
                free[node][0] -= cpu
                free[node][1] -= mem
                heapq.heappush(events, (now + st["seconds"] + st["overhead_s"], m, node))
                ready.remove(m)
                placed = True
        now, m, node = heapq.heappop(events)
        st = stages[names[nxt[m]]]
        free[node][0] += min(st["num_cpus"], node_cpus)
        free[node][1] += st["memory_gib"]
        nxt[m] += 1
        if nxt[m] < len(names):
            ready.append(m)
    return now


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=40e6)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    import ray

    base, adapters = build_inputs(a.workdir, a.params, a.models)
    run = a.workdir / "scale"
    shutil.rmtree(run, ignore_errors=True)
    for f in [*base.iterdir(), *(p for d in adapters for p in d.iterdir())]:  # same warm page cache for both
        f.read_bytes()

    local_s, local = timed_run(config(run / "local", base, adapters, "local"))
    t0 = time.monotonic()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_start_s = time.monotonic() - t0
    node = ray.nodes()[0]["Resources"]
    try:
        ray_s, ours = timed_run(config(run / "ray", base, adapters, "ray"))
    finally:
        ray.shutdown()
    stages = per_stage(local, ours)
    heavy_local = sum(o.seconds for mo in local.models.values() for s, o in mo.stages.items() if s in HEAVY)
    task_over = sum(o.info["ray"]["seconds_on_driver"] - o.info["ray"]["seconds_on_node"]
                    for mo in ours.models.values() for s, o in mo.stages.items() if s in HEAVY)
    cpus, mem_gib = node.get("CPU", os.cpu_count() or 1), node.get("memory", 0) / 2**30
    chain = sum(s["seconds"] for s in stages.values())
    result = {
        "model": {"params": int(a.params), "models": a.models, "formats": FORMATS, "stages": STAGES},
        "machine": {"cpus": cpus, "ray_memory_gib": round(mem_gib, 2)},
        "baseline": {"executor": "local", "seconds": round(local_s, 3), "heavy_stage_seconds": round(heavy_local, 3)},
        "ours": {"executor": "ray", "seconds": round(ray_s, 3), "ray_start_seconds": round(ray_start_s, 3),
                 "task_overhead_seconds": round(task_over, 3),
                 "nodes": sorted({o.info["node"] for mo in ours.models.values() for s, o in mo.stages.items()
                                  if s in HEAVY})},
        "ratios": {"seconds": round(ray_s / local_s, 3)},
        "overhead_pct": round(100 * (ray_s - local_s) / ray_s, 2),
        "task_overhead_pct": round(100 * task_over / ray_s, 2),
        "targets": TARGETS,
        "identical": digests(local) == digests(ours),
        "per_stage": stages,
        "projection_16_adapters": {
            "local_executor_seconds": round(16 * chain, 1),
            **{f"ray_{n}_nodes_seconds": round(project(stages, 16, n, cpus, mem_gib), 1) for n in (1, 4, 16)}},
    }
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"local {local_s:.1f} s   ray {ray_s:.1f} s (+{ray_start_s:.1f} s to start Ray)   "
          f"overhead {result['overhead_pct']:.1f} % (per task {result['task_overhead_pct']:.1f} %)   "
          f"identical: {result['identical']}")
    for s, v in stages.items():
        print(f"  {s:9s} {v['seconds']:6.2f} s  peak {v['peak_rss_mib']:6.0f} MiB  asks {v['num_cpus']} CPU, "
              f"{v['memory_gib']:.2f} GiB  overhead {v['overhead_s']:.2f} s")
    print("16 adapters:", result["projection_16_adapters"])


if __name__ == "__main__":
    main()
