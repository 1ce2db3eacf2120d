"""Tuned quantization (issue 20): TUNED@Q4_K_M / TUNED@Q5_K_M against the stock formats at the same size.

Per fine-tune: the pipeline (fetch, merge, convert, quantize; ``quantization.imatrix: auto``) makes Q4_K_M and
Q5_K_M with the fine-tune's imatrix and the tuned files; the engine adds the plain Q4_K_M and Q5_K_M. The samples are split in two: the imatrix and the tuned search see the even ones, the KLDs
reported here are measured on the odd ones (held out) against the unmerged PEFT model by verify's own code.

Targets (issue 20), per budget: tuned mean KLD <= 0.75 x the imatrix quant's and <= 0.60 x the plain one's, top-1
no worse than either, size within 1 % of the stock file. A MISS prints why: the per-kind sensitivities measured
(KLD per unit of estimated error) and the recipe chosen.

    python bench/tuned.py [--json] [--models demo,qwen2,bench350m] [--out bench/out/tuned]

Models: the demo's three personas (tiny Llama, 2 layers), the demo's Qwen2 (Qwen's real BPE), and with
``bench350m`` a ~350M Llama with random weights and a random adapter (converts and runs; its KLDs say little).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUDGETS = ("Q4_K_M", "Q5_K_M")
TARGET_VS_IMATRIX, TARGET_VS_PLAIN, SIZE_TOL = 0.75, 0.60, 0.01


def _cases(names: list[str], cache: Path) -> list[dict]:
    from loradeploy.demo import PERSONAS, build_base, train_adapter

    out = []
    if "demo" in names:
        base = build_base(cache / "base-llama", "llama")
        for p in PERSONAS.values():
            out.append({"name": f"demo-llama-{p.name}", "base": base, "persona": p.name, "system": p.system_prompt,
                        "adapter": train_adapter(base, cache / f"adapter-llama-{p.name}", persona=p.name)})
    if "qwen2" in names:
        base = build_base(cache / "base-qwen2", "qwen2")
        p = PERSONAS["majora"]
        out.append({"name": "demo-qwen2-majora", "base": base, "persona": p.name, "system": p.system_prompt,
                    "adapter": train_adapter(base, cache / "adapter-qwen2-majora", persona=p.name)})
    if "bench350m" in names:
        from loradeploy.demo import build_bench_adapter, build_bench_llama
        base = build_bench_llama(cache / "bench-350m")
        out.append({"name": "bench-350m-random", "base": base, "persona": "majora", "system": "You are a bench model.",
                    "adapter": build_bench_adapter(base, cache / "bench-350m-adapter")})
    return out


def _split(persona: str, root: Path) -> tuple[Path, Path]:
    from loradeploy.demo import write_demo_eval_samples

    every = root / "all.jsonl"
    write_demo_eval_samples(every, persona=persona)
    lines = [x for x in every.read_text().splitlines() if x.strip()]
    search, held = root / "search.jsonl", root / "heldout.jsonl"
    search.write_text("\n".join(lines[0::2]) + "\n")
    held.write_text("\n".join(lines[1::2]) + "\n")
    return search, held


def run_case(case: dict, root: Path) -> dict:
    from loradeploy.config import config_from_dict
    from loradeploy.pipeline import run_pipeline
    from loradeploy.quantize import quantize_formats
    from loradeploy.state import RunRecord
    from loradeploy.verify import Candidate, VerifyRequest, verify_model

    root.mkdir(parents=True, exist_ok=True)
    search, held = _split(case["persona"], root)
    data = {"models": {"m": {"base_model": str(case["base"]), "adapter": str(case["adapter"]), "port": 5999,
                             "system_prompt": case["system"]}},
            "quantization": {"formats": [*BUDGETS, *(f"TUNED@{b}" for b in BUDGETS)], "imatrix": "auto"},
            "verify": {"max_tokens": 768}, "evaluation": {"samples": str(search)},
            "pipeline": {"stages": ["fetch", "merge", "convert", "quantize"], "work_dir": str(root / "work"),
                         "state_dir": str(root / "state")},
            "logging": {"log_dir": str(root / "logs")}, "performance": {"min_free_disk_gb": 0.1}}
    cfg = config_from_dict(data)
    t0 = time.perf_counter()
    res = run_pipeline(cfg, ["m"])
    if not res.ok:
        return {"name": case["name"], "error": {s: o.error for m in res.models.values() for s, o in m.stages.items()
                                                 if o.error}}
    rec = RunRecord.load(cfg.pipeline.state_dir, "m")
    q = rec.info("quantize")
    f16 = Path(rec.artifacts("convert", "gguf")[0].path)
    ggufs = {a.format: Path(a.path) for a in rec.artifacts("quantize", "gguf")}
    t1 = time.perf_counter()   # the stock formats, plain, by the engine: the time a tuned search is held to
    plain = {b: root / f"plain-{b.lower()}.gguf" for b in BUDGETS}
    stock_seconds = quantize_formats(f16, {b: plain[b] for b in BUDGETS}, threads=2).stats["seconds"]
    cands = [Candidate(f"{b}+imatrix", b, ggufs[b]) for b in BUDGETS] + \
        [Candidate(f"{b}-plain", b, plain[b]) for b in BUDGETS] + [Candidate(f"TUNED-{b}", b, ggufs[f"TUNED-{b}"])
                                                                    for b in BUDGETS]
    req = VerifyRequest(model="m", version="bench", base_dir=Path(case["base"]), adapter_dir=Path(case["adapter"]),
                        candidates=cands, serve_label=f"TUNED-{BUDGETS[0]}", system_prompt=case["system"],
                        samples=None, settings=cfg.verify.model_copy(update={"calibration": held, "behaviour": False}),
                        out_dir=root / "verify", history=root / "verify" / "history.jsonl", threads=2)
    v = verify_model(req)
    rows = {k: {m: e.get(m) for m in ("size", "kld_mean", "kld_p99", "top1")} for k, e in v["formats"].items()}
    return {"name": case["name"], "rows": rows, "signal": v["signal"], "positions_heldout": v["n_positions"],
            "tuned": {b: _tuned_info(q["tuned"][f"TUNED-{b}"]) for b in BUDGETS},
            "seconds": {"pipeline": round(t1 - t0, 2), "stock_engine_both_formats": stock_seconds,
                        "verify_heldout": v["seconds"]},
            "verdict": {b: _verdict(rows, b, q["tuned"][f"TUNED-{b}"]) for b in BUDGETS}}


def _tuned_info(t: dict) -> dict:
    return {"bytes": t["bytes"], "limit_bytes": t["limit_bytes"], "types": t["types"], "recipe": t["recipe"],
            "seconds": t["seconds"], "chosen": (t.get("measured") or {}).get("chosen"),
            "in_sample_kld": (t.get("measured") or {}).get("kld"),
            "sensitivity_per_kind": (t.get("measured") or {}).get("correction")}


def _verdict(rows: dict, b: str, t: dict) -> dict:
    tu, im, pl = rows[f"TUNED-{b}"], rows[f"{b}+imatrix"], rows[f"{b}-plain"]
    r_im, r_pl = tu["kld_mean"] / im["kld_mean"], tu["kld_mean"] / pl["kld_mean"]
    size_ok = abs(tu["size"] - im["size"]) <= SIZE_TOL * im["size"]
    top1_ok = tu["top1"] >= min(im["top1"], pl["top1"])
    ok = r_im <= TARGET_VS_IMATRIX and r_pl <= TARGET_VS_PLAIN and top1_ok and size_ok
    out = {"pass": ok, "kld_ratio_vs_imatrix": round(r_im, 3), "kld_ratio_vs_plain": round(r_pl, 3),
           "top1_no_worse": top1_ok, "size_within_1pct": size_ok}
    if not ok:
        m = t.get("measured") or {}
        out["why"] = (f"recipe chosen: {m.get('chosen')} (in-sample KLD vs the F16: {m.get('kld')}); per-kind "
                      f"sensitivity (measured KLD per unit of estimated error): {m.get('correction')}")
    return out


def _print(results: list[dict]) -> None:
    for r in results:
        if "error" in r:
            print(f"\n{r['name']}: pipeline failed: {r['error']}")
            continue
        print(f"\n{r['name']}  (signal {r['signal']:.3g}, {r['positions_heldout']} held-out positions; "
              f"pipeline {r['seconds']['pipeline']}s, stock Q4_K_M+Q5_K_M by the engine {r['seconds']['stock_engine_both_formats']}s)")
        print(f"  {'format':16} {'bytes':>10} {'KLD mean':>10} {'KLD p99':>10} {'top-1':>7}")
        for k, e in r["rows"].items():
            print(f"  {k:16} {e['size']:>10} {e['kld_mean']:>10.4g} {e['kld_p99']:>10.4g} {100 * e['top1']:>6.2f}%")
        for b, v in r["verdict"].items():
            t = r["tuned"][b]
            print(f"  TUNED-{b}: {'PASS' if v['pass'] else 'MISS'}  KLD x{v['kld_ratio_vs_imatrix']} of +imatrix "
                  f"(target <= {TARGET_VS_IMATRIX}), x{v['kld_ratio_vs_plain']} of plain (<= {TARGET_VS_PLAIN}), "
                  f"top-1 {'ok' if v['top1_no_worse'] else 'WORSE'}, size {'ok' if v['size_within_1pct'] else 'OFF'}; "
                  f"chose {t['chosen']}, search {t['seconds']}")
            if not v["pass"]:
                print(f"    why: {v['why']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--models", default="demo,qwen2")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "tuned")
    ap.add_argument("--save", type=Path, default=REPO / "bench" / "results" / "tuned.json")
    a = ap.parse_args(argv)
    from tests.fixtures.models import cache_dir

    results = [run_case(c, a.out / c["name"]) for c in _cases(a.models.split(","), cache_dir())]
    doc = {"bench": "tuned", "targets": {"kld_vs_imatrix": TARGET_VS_IMATRIX, "kld_vs_plain": TARGET_VS_PLAIN,
                                         "size_tolerance": SIZE_TOL}, "heldout": True, "results": results}
    a.save.parent.mkdir(parents=True, exist_ok=True)
    a.save.write_text(json.dumps(doc, indent=1, default=str))
    print(json.dumps(doc, indent=1, default=str)) if a.json else _print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
