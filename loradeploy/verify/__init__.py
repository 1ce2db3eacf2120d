"""Verify: prove, per GGUF, that the fine-tune survived merge, conversion and quantization.

``calibration`` builds the token ids; ``reference`` runs the unmerged PEFT model (and the base with
the adapter off: the signal) into a log-prob memmap; ``candidates`` feeds the same ids to each GGUF
through llama.cpp; ``metrics`` has llama.cpp's KLD statistics; ``behaviour`` checks the chat
template and the end of turn; ``gate`` turns it all into pass/fail and what to serve; ``report``
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
from .report import health_check, history_path, served_verdict, verify_dir  # noqa: F401

if TYPE_CHECKING:
    from ..config.verify import VerifyConfig

Progress = Callable[[str, float, float], None]
SCHEMA_VERSION = 1


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


def verify_model(req: VerifyRequest, *, log: Optional[logging.Logger] = None,
                 progress: Optional[Progress] = None) -> dict:
    """Reference first (then freed), every candidate after; returns the verify.json data."""
    from .behaviour import stop_conversations, template_cases
    from .calibration import build_calibration, load_tokenizer
    from .candidates import score_candidate, with_imatrix_twins
    from .gate import decide, judge, limits_for
    from .metrics import noise_to_signal
    from .reference import run_reference
    from .report import append_history, stamp, write_verify_json

    log = log or logging.getLogger("loradeploy.verify")
    s = req.settings
    t0 = time.monotonic()
    missing = [c.label for c in req.candidates if not Path(c.path).is_file()]
    if missing:
        raise VerifyError(f"GGUF(s) to verify are missing: {', '.join(missing)}", hint="re-run quantize")
    tok = load_tokenizer(req.base_dir, req.adapter_dir)
    cal = build_calibration(tok, system_prompt=req.system_prompt, calibration=s.calibration, samples=req.samples,
                            max_tokens=s.max_tokens, max_seq_len=s.max_seq_len)
    log.info("calibration: %d sequences, %d tokens, %d scored positions from %s", len(cal.sequences),
             cal.n_tokens, cal.n_positions, cal.source)
    convs = stop_conversations(cal.conversations, s.stop_prompts, req.system_prompt) if s.behaviour else []
    cases = template_cases(tok, req.system_prompt, cal.conversations) if s.behaviour else []
    scratch = Path(req.out_dir) / "reference-logprobs.npy"
    try:
        ref = run_reference(req.base_dir, req.adapter_dir, tok, cal, scratch, device=s.device, threads=req.threads,
                            stop_convs=convs, max_new_tokens=s.max_new_tokens, progress=progress)
        signal = ref.signal.get("kld_mean")
        log.info("reference (%s, %s) in %.1fs; signal KLD(reference||base) %.4g", ref.device, ref.dtype,
                 ref.seconds, signal or 0.0)
        entries: dict[str, dict] = {}
        cands = with_imatrix_twins(req.candidates)
        for i, cand in enumerate(cands):
            if progress:
                progress(f"verifying {cand.label}", i, len(cands))
            e = score_candidate(cand, cal, ref, threads=req.threads, cases=cases,
                                behaviour=s.behaviour and cand.gated, progress=progress)
            e["noise_to_signal"] = noise_to_signal(e.get("kld_mean"), signal)
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
    decision = decide(entries, req.serve_label, s.on_fail, model=req.model, version=req.version)
    if decision.verdict != "passed":
        log.warning("%s", decision.reason)
    behaviours = [e for e in entries.values() if e.get("gated", True)]
    data = {
        "schema_version": SCHEMA_VERSION, "model": req.model, "version": req.version, "created_at": stamp(),
        "seconds": round(time.monotonic() - t0, 3),
        "reference": {"base": str(req.base_dir), "adapter": str(req.adapter_dir), "device": ref.device,
                      "dtype": ref.dtype, "seconds": ref.seconds, "vocab": ref.vocab,
                      "generations": [g.to_dict() for g in ref.generations]},
        "calibration": {"source": cal.source, "sequences": len(cal.sequences), "tokens": cal.n_tokens,
                        "sha256": cal.digest()},
        "n_positions": cal.n_positions, "signal": signal, "signal_stats": ref.signal,
        "template_ok": all((e.get("template") or {}).get("ok", True) for e in behaviours) if s.behaviour else None,
        "stop_ok": all((e.get("stop") or {}).get("ok", True) for e in behaviours) if s.behaviour else None,
        "formats": entries, "gate": decision.to_dict(), "served_format": decision.served,
        "settings": s.model_dump(mode="json"),
    }
    path = write_verify_json(Path(req.out_dir) / "verify.json", data)
    data["path"] = str(path)
    append_history(req.history, data)
    return data


__all__ = ["Candidate", "VerifyRequest", "health_check", "history_path", "served_verdict", "verify_dir",
           "verify_model"]
