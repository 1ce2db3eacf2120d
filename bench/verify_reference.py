"""Verify's PEFT reference at scale: streamed (one layer at a time) against in memory, one process each.

Runs the reference of verify on a base + adapter (e.g. bench/model_scale.py's Qwen2.5-shaped ones) with
verify's own calibration (a few chat samples + the built-in text, verify.max_tokens auto unless
--tokens), and prints seconds, peak RSS (the kernel's ru_maxrss of this process: no sampling gap),
the estimate verify makes from headers before it starts, and their ratio. --json for one JSON line.

    .venv/bin/python bench/verify_reference.py --base B --adapter A [--mode streamed|memory]
        [--tokens auto|N] [--threads N] [--calibration FILE] [--json]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLES = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write a haiku about the sea.", "Grey waves fold and break,\nsalt wind over empty sand,\nthe tide keeps its time."),
    ("Explain what a hash function does in one paragraph.",
     "A hash function maps data of any size to a fixed-size value. The same input always gives the same "
     "output, small changes give very different outputs, and it is hard to find two inputs with one output."),
    ("List three fruits.", "Apples, pears and plums."),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--mode", default="streamed", choices=["streamed", "memory"])
    ap.add_argument("--tokens", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--calibration", type=Path, default=None, help="verify.calibration (a text file: fills the "
                                                                   "whole token budget)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from loradeploy.merge.hf_folder import load_base_info
    from loradeploy.verify.calibration import build_calibration, load_tokenizer
    from loradeploy.verify.memory import Shape, baseline, reference_estimate
    from loradeploy.verify.reference import eos_ids, run_reference

    tmp = Path(tempfile.mkdtemp(prefix="verify-ref-"))
    samples = tmp / "samples.jsonl"
    samples.write_text("".join(json.dumps({"id": f"s{i}", "prompt": p, "reference": r}) + "\n"
                                for i, (p, r) in enumerate(SAMPLES)))
    tok = load_tokenizer(a.base, a.adapter)
    eos = eos_ids(tok, a.base)
    tokens = a.tokens if a.tokens == "auto" else int(a.tokens)
    cal = build_calibration(tok, system_prompt="", calibration=a.calibration, samples=samples, max_tokens=tokens,
                            max_seq_len=512, eos=eos, base_dir=a.base)
    base = load_base_info(a.base)
    vocab = int(base.config.get("vocab_size"))
    est = reference_estimate(base, Shape(cal.n_tokens, cal.n_positions, cal.longest,
                                         sum(len(s) ** 2 for s in cal.sequences)), a.mode, vocab,
                             baseline())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.monotonic()
    last = [0.0]

    def progress(desc, i, n):
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            print(f"[{time.monotonic() - t0:6.0f}s] {desc} {i:.0f}/{n:.0f}", file=sys.stderr, flush=True)

    run = run_reference(a.base, a.adapter, cal, tmp / "ref.npy", mode=a.mode, device="cpu", threads=a.threads,
                        eos=eos, progress=progress)
    secs = time.monotonic() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (tmp / "ref.npy").unlink()
    samples.unlink()
    tmp.rmdir()
    out = {"mode": a.mode, "params": base.param_count, "tokens": cal.n_tokens, "positions": cal.n_positions,
           "sequences": len(cal.sequences), "turn_ends": len(cal.turn_ends), "seconds": round(secs, 1),
           "tokens_per_s": round(cal.n_tokens / secs, 2), "peak_rss_mib": round(peak / 2**20),
           "rss_before_mib": round(before / 2**20), "estimate_mib": round(est.rss / 2**20),
           "estimate_over_measured": round(est.rss / peak, 3), "estimate_parts_mib":
               {k: round(v / 2**20) for k, v in est.parts.items()},
           "signal_kld": run.signal.get("kld_mean"), "stop_conclusive": any(t["ends"] for t in run.turn_ends)}
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:24} {v}")


if __name__ == "__main__":
    main()
