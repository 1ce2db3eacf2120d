"""Verify: prove, per GGUF, that the fine-tune survived merge, conversion and quantization.

``calibration`` builds the token ids; ``memory`` sizes the run from headers and refuses what does not
fit; ``reference`` runs the unmerged PEFT model (and the base with the adapter off: the signal) into a
log-prob memmap, streamed one layer at a time (``streamed``, ``weights``) or in memory; ``candidates`` feeds the same ids to each GGUF
through llama.cpp; ``metrics`` has llama.cpp's KLD statistics; ``behaviour`` checks the chat
template and the end of turn (teacher forced, from the scoring pass); ``gate`` turns it all into pass/fail and what to serve; ``report``
writes verify.json, history.jsonl and the evaluation section. ``verify_model`` is the entry.
Heavy libraries (torch, transformers, peft, llama_cpp) load only when a check runs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import VerifyError
from .candidates import Candidate
from .report import health_check, history_path, verify_dir  # noqa: F401

if TYPE_CHECKING:
    from ..config.verify import VerifyConfig

Progress = Callable[[str, float, float], None]
SCHEMA_VERSION = 2


@dataclass
class VerifyRequest:
    model: str
    version: str
    base_dir: Path
    adapter_dir: Path
    candidates: list[Candidate]
    serve_label: str                 # the label deployment.format asks for
    system_prompt: str
    samples: Optional[Path]          # the evaluation samples (the default calibration)
    settings: "VerifyConfig"
    out_dir: Path                    # verify.json and the scratch memmap
    history: Path
    threads: int = 0
    max_memory_gb: Optional[float] = None   # performance.max_memory_gb


def _plan(req: VerifyRequest, cal, cands: list[Candidate], cases) -> tuple[str, dict]:
    """How the reference runs and the estimated peaks; refuses (one line) what does not fit."""
    import torch

    from ..errors import ResourceError
    from ..llamacpp import runtime
    from ..merge.hf_folder import load_base_info
    from .candidates import n_ctx_for
    from .memory import (Shape, baseline, candidate_estimate, check_fits, head_vocab, plan_reference,
                         reference_estimate)

    s = req.settings
    base = load_base_info(req.base_dir)
    mtype = str(base.config.get("model_type", "?"))
    mode = plan_reference(s.reference, s.device, mtype, torch.cuda.is_available())
    vocab = head_vocab(base)
    shape = Shape(cal.n_tokens, cal.n_positions, cal.longest, sum(len(x) ** 2 for x in cal.sequences))
    now = baseline()
    ref = reference_estimate(base, shape, mode, vocab, now)
    n_ctx = n_ctx_for(cal, cases)
    extra = runtime.decide().extra_bufts
    cand = [candidate_estimate(c.path, n_ctx, vocab, base.config, extra_bufts=extra, lora=c.lora,
                               runtime=now) for c in cands]
    keys = "verify.max_tokens / verify.max_seq_len shrink the activations"
    try:
        check_fits([ref], req.max_memory_gb, hint_keys=keys if mode == "streamed" else
                   "verify.reference: streamed holds one layer at a time")
    except ResourceError:
        if s.reference == "auto" and mode == "memory" and s.device != "cuda":
            from ..errors import VerifyError
            raise VerifyError(f"the reference cannot stream a {base.architecture} (model type {mtype}) and the "
                              "whole model does not fit in memory",
                              hint="raise performance.max_memory_gb, or verify on a larger machine") from None
        raise
    check_fits(cand, req.max_memory_gb, hint_keys="verify.formats leaves out the largest GGUFs")
    peak = max([ref, *cand], key=lambda e: e.rss)
    return mode, {"reference": ref.to_dict(), "candidates": {c.label: e.to_dict() for c, e in zip(cands, cand)},
                  "peak_rss_bytes": peak.rss, "peak_anon_bytes": max(e.anon for e in [ref, *cand])}


def _all_ok(entries, check: str) -> Optional[bool]:
    """False when any failed, None when none was conclusive, else True."""
    oks = [(e.get(check) or {}).get("ok", True) for e in entries]
    return False if False in oks else None if oks and all(o is None for o in oks) else True


def verify_model(req: VerifyRequest, *, log: Optional[logging.Logger] = None,
                 progress: Optional[Progress] = None) -> dict:
    """Reference first (then freed), every candidate after; returns the verify.json data."""
    from ..resources import PeakRSS
    from .behaviour import stop_summary, template_cases
    from .calibration import build_calibration, load_tokenizer
    from .candidates import score_candidate, with_imatrix_twins
    from .gate import decide, judge, limits_for
    from .metrics import noise_to_signal
    from .reference import eos_ids, run_reference
    from .report import append_history, stamp, write_verify_json
    from .tuned import recipe_entry

    log = log or logging.getLogger("loradeploy.verify")
    s = req.settings
    t0 = time.monotonic()
    missing = [c.label for c in req.candidates if not Path(c.path).is_file()]
    if missing:
        raise VerifyError(f"GGUF(s) to verify are missing: {', '.join(missing)}", hint="re-run quantize")
    tok = load_tokenizer(req.base_dir, req.adapter_dir)
    eos = eos_ids(tok, req.base_dir)
    cal = build_calibration(tok, system_prompt=req.system_prompt, calibration=s.calibration, samples=req.samples,
                            max_tokens=s.max_tokens, max_seq_len=s.max_seq_len, eos=eos, base_dir=req.base_dir)
    log.info("calibration: %d sequences, %d tokens, %d scored positions, %d assistant turn ends from %s",
             len(cal.sequences), cal.n_tokens, cal.n_positions, len(cal.turn_ends), cal.source)
    cases = template_cases(tok, req.system_prompt, cal.conversations) if s.behaviour else []
    cands = with_imatrix_twins(req.candidates)
    mode, memory = _plan(req, cal, cands, cases)
    log.info("memory estimate: reference (%s) %.2f GiB, peak RSS %.2f GiB (of it anonymous %.2f GiB)", mode,
             memory["reference"]["rss_bytes"] / 2**30, memory["peak_rss_bytes"] / 2**30,
             memory["peak_anon_bytes"] / 2**30)
    scratch = Path(req.out_dir) / "reference-logprobs.npy"
    try:
        with PeakRSS() as ref_peak:
            ref = run_reference(req.base_dir, req.adapter_dir, cal, scratch, mode=mode, device=s.device,
                                threads=req.threads, eos=eos, progress=progress)
        memory["reference"]["measured_peak_rss_bytes"] = ref_peak.peak
        signal = ref.signal.get("kld_mean")
        log.info("reference (%s, %s, %s) in %.1fs, peak RSS %.0f MiB; signal KLD(reference||base) %.4g", ref.mode,
                 ref.device, ref.dtype, ref.seconds, ref_peak.peak_mib, signal or 0.0)
        entries: dict[str, dict] = {}
        for i, cand in enumerate(cands):
            if progress:
                progress(f"verifying {cand.label}", i, len(cands))
            with PeakRSS() as cand_peak:
                e = score_candidate(cand, cal, ref, threads=req.threads, cases=cases,
                                    behaviour=s.behaviour and cand.gated, progress=progress)
            memory["candidates"][cand.label]["measured_peak_rss_bytes"] = cand_peak.peak
            e["noise_to_signal"] = noise_to_signal(e.get("kld_mean"), signal)
            if (tuned := recipe_entry(cand.label, cand.path)) is not None:
                e["tuned"] = tuned
            limits = limits_for(cand.fmt, s)
            e["limits"] = limits.to_dict()
            if cand.gated or cand.variant:  # a variant (the plain twin) is judged, though never served
                fails = judge(e, limits, signal)
                e["passed"], e["failures"] = not fails, [asdict(f) for f in fails]
            else:
                e["passed"], e["failures"] = None, []
            entries[cand.label] = e
            log.info("%s: KLD mean %.4g p99 %.4g, top-1 %.2f%%, RMS Δp %.4g, noise/signal %s: %s", cand.label,
                     e.get("kld_mean") or 0, e.get("kld_p99") or 0, 100 * (e.get("top1") or 0), e.get("rms_dp") or 0,
                     "–" if e["noise_to_signal"] is None else f"{e['noise_to_signal']:.3g}",
                     "yardstick" if e["passed"] is None else "pass" if e["passed"] else
                     "FAIL (" + "; ".join(f["why"] for f in e["failures"]) + ")")
    finally:
        scratch.unlink(missing_ok=True)
    if progress:
        progress("verified", len(cands), len(cands))
    decision = decide(entries, req.serve_label, s.on_fail, model=req.model, version=req.version)
    if decision.verdict != "passed":
        log.warning("%s", decision.reason)
    behaviours = [e for e in entries.values() if e.get("gated", True)]
    stop = stop_summary(ref.turn_ends)
    if s.behaviour and not stop["conclusive"]:
        log.warning("stop check inconclusive: the reference ends none of its %d assistant turns", stop["turns"])
    data = {
        "schema_version": SCHEMA_VERSION, "model": req.model, "version": req.version, "created_at": stamp(),
        "seconds": round(time.monotonic() - t0, 3),
        "reference": {"base": str(req.base_dir), "adapter": str(req.adapter_dir), "device": ref.device,
                      "dtype": ref.dtype, "mode": ref.mode, "seconds": ref.seconds, "vocab": ref.vocab,
                      "stop": stop, "eos_ids": eos},
        "calibration": {"source": cal.source, "sequences": len(cal.sequences), "tokens": cal.n_tokens,
                        "turn_ends": len(cal.turn_ends), "sha256": cal.digest()},
        "n_positions": cal.n_positions, "signal": signal, "signal_stats": ref.signal, "memory": memory,
        "template_ok": _all_ok(behaviours, "template") if s.behaviour else None,
        "stop_ok": _all_ok(behaviours, "stop") if s.behaviour else None,
        "formats": entries, "gate": decision.to_dict(), "served_format": decision.served,
        "settings": s.model_dump(mode="json"),
    }
    path = write_verify_json(Path(req.out_dir) / "verify.json", data)
    data["path"] = str(path)
    append_history(req.history, data)
    return data


__all__ = ["Candidate", "VerifyRequest", "health_check", "history_path", "verify_dir", "verify_model"]
