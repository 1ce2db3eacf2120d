"""llama.cpp's default CPU mode against its safe mode, on the bench model, side by side.

Each mode runs in its own child (``python -m loradeploy.llamacpp.probe``'s loader, here with a
real model), so a mode that kills the process on this CPU is reported — with how it died — instead
of killing the benchmark. Decode and prompt tokens/s per mode, the ratio default/safe, and what
the runtime decision picked for this machine.

    .venv/bin/python bench/cpu_mode.py [--params 350e6] [--workdir bench/out/cpu_mode] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from loradeploy.llamacpp import runtime  # noqa: E402
from loradeploy.tools.proc import describe_exit, package_pythonpath, run  # noqa: E402

CHILD = r"""
import json, sys, time
from loradeploy.llamacpp.runtime import apply_mode
mode, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
apply_mode(mode == "default")
import llama_cpp
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=256, n_threads=threads, n_threads_batch=threads,
                      verbose=False)
prompt = [1] + [3 + (13 * k) % 500 for k in range(255)]
t0 = time.perf_counter(); llm.eval(prompt); pp = time.perf_counter() - t0
t0 = time.perf_counter(); n = 0
for tok in llm.generate([], temp=0.0, reset=False):
    n += 1
    if n >= 64:
        break
tg = time.perf_counter() - t0
print("RESULT " + json.dumps({"prompt_tps": len(prompt) / pp, "decode_tps": n / tg}), flush=True)
"""


def build_model(workdir: Path, params: float) -> Path:
    from loradeploy.demo.bench_models import build_bench_llama
    from loradeploy.tools import converter
    from loradeploy.tools.llama_quantize import quantize

    q4 = workdir / f"bench-{int(params / 1e6)}m-q4_k_m.gguf"
    if q4.exists():
        return q4
    base = build_bench_llama(workdir / "base", target_params=int(params))
    f16 = workdir / "bench-f16.gguf"
    converter.convert(base, f16, log_path=workdir / "convert.log")
    tmp = q4.with_suffix(".tmp")
    if quantize(str(f16), str(tmp), 15, nthread=2) != 0:
        raise SystemExit("quantize failed")
    tmp.rename(q4)
    return q4


def measure(mode: str, model: Path, threads: int, log: Path) -> dict:
    t0 = time.monotonic()
    cp = run([sys.executable, "-c", CHILD, mode, str(model), str(threads)], check=False, timeout=600,
             log_path=log, env={"PYTHONPATH": package_pythonpath()})
    line = next((l for l in cp.stdout.splitlines() if l.startswith("RESULT ")), None)
    if cp.returncode == 0 and line:
        return {"mode": mode, "ok": True, **json.loads(line[7:]), "seconds": round(time.monotonic() - t0, 2)}
    return {"mode": mode, "ok": False, "how": describe_exit(cp.returncode)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=350e6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("bench/out/cpu_mode"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.workdir, args.params)
    decided = runtime.decide()
    rows = [measure(m, model, args.threads, args.workdir / "bench.log") for m in ("default", "safe")]
    both = all(r["ok"] for r in rows)
    out = {"model": str(model), "params": args.params, "threads": args.threads, "decided": decided.as_dict(),
           "modes": {r["mode"]: r for r in rows},
           "ratio_default_over_safe": ({k: rows[0][k] / rows[1][k] for k in ("prompt_tps", "decode_tps")}
                                       if both else None)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    t = Table(title=f"llama.cpp CPU modes on {model.name} ({args.threads} threads)")
    for c in ("mode", "result", "prompt tok/s", "decode tok/s"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["mode"], "ok" if r["ok"] else r["how"], f"{r.get('prompt_tps', 0):.1f}" if r["ok"] else "-",
                  f"{r.get('decode_tps', 0):.1f}" if r["ok"] else "-")
    c = Console()
    c.print(t)
    if both:
        c.print(f"default/safe: prompt {out['ratio_default_over_safe']['prompt_tps']:.2f}x, "
                f"decode {out['ratio_default_over_safe']['decode_tps']:.2f}x")
    c.print(f"runtime decision for this machine: {decided.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
