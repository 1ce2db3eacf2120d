"""Candidates: every produced GGUF (F16 and each quant), and the base GGUF when one was converted.

Each is loaded by llama-cpp-python in the CPU mode the runtime decided (``runtime.load``), fed the
very token ids the reference read, and compared position by position with the reference's
log-probabilities from the memmap. One GGUF is loaded at a time, and its logits buffer is sized to
the longest sequence, so memory stays bounded by one model plus n_ctx x vocabulary floats.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .behaviour import TemplateCase, check_stop, check_template
from .calibration import Calibration
from .metrics import PositionStats
from .reference import ReferenceRun, threads_for

Progress = Callable[[str, float, float], None]


@dataclass(frozen=True)
class Candidate:
    """One GGUF to compare with the reference.

    ``label`` names it in reports and is what the gate serves (``Q4_K_M``; a second recipe of the
    same type, such as an importance-matrix quant, gets its own label with ``variant`` set, e.g.
    ``Q4_K_M+imatrix``); ``fmt`` is the llama.cpp type whose thresholds apply. ``gated`` is False
    for yardsticks that are never served (the base GGUF).
    """

    label: str
    fmt: str
    path: Path
    sha256: Optional[str] = None
    gated: bool = True
    variant: Optional[str] = None
    lora: Optional[Path] = None        # adapter mode: this LoRA GGUF applied at run time to ``path``

    def to_dict(self) -> dict:
        return {"label": self.label, "format": self.fmt, "path": str(self.path), "sha256": self.sha256,
                "gated": self.gated, "variant": self.variant, "size": self.path.stat().st_size
                if self.path.is_file() else None, "lora": str(self.lora) if self.lora else None,
                "mode": "adapter" if self.lora else "merged"}


def with_imatrix_twins(cands: Sequence[Candidate]) -> list[Candidate]:
    """Each imatrix quant followed by its plain twin (built by quantize, see ``quantize.imatrix``), so
    the report shows what the importance matrix bought. The twin is judged with the same type's
    limits but never served: only the imatrix file is deployed."""
    from ..quantize.imatrix import twin_path

    out: list[Candidate] = []
    for c in cands:
        twin = twin_path(c.path)
        if not (c.gated and twin.is_file()):
            out.append(c)
            continue
        out += [replace(c, variant="imatrix"),
                Candidate(f"{c.label}-no-imatrix", c.fmt, twin, gated=False, variant="no-imatrix")]
    return out


def n_ctx_for(cal: Calibration, cases: Sequence[TemplateCase]) -> int:
    need = [cal.longest] + [len(c.hf_ids) for c in cases]
    return max(64, -(-max(need) // 32) * 32)


def score_candidate(cand: Candidate, cal: Calibration, ref: ReferenceRun, *, threads: int,
                    cases: Sequence[TemplateCase], behaviour: bool,
                    progress: Optional[Progress] = None) -> dict:
    """Metrics and behaviour of one GGUF; a GGUF that cannot even be compared gets an ``error``."""
    from ..llamacpp import runtime

    t0 = time.monotonic()
    out: dict = {**cand.to_dict()}
    n_ctx = n_ctx_for(cal, cases)
    n_threads = threads_for(cand.path.stat().st_size, threads or 1)
    lora = {"lora_path": str(cand.lora)} if cand.lora else {}
    llm = runtime.load(cand.path, n_ctx=n_ctx, n_batch=min(512, n_ctx), logits_all=True,
                       n_threads=n_threads, n_threads_batch=n_threads, seed=0, **lora)
    try:
        if llm.n_vocab() != ref.vocab:
            out["error"] = (f"vocabulary differs: the GGUF has {llm.n_vocab()} tokens, the reference "
                            f"{ref.vocab}; its logits cannot be compared")
            return out
        stats = PositionStats()
        tops: dict[int, int] = {}   # turn end -> the GGUF's top-1 there, from the same logits as the KLD
        fd = os.open(ref.logprobs_path, os.O_RDONLY)
        try:
            for i, seq in enumerate(cal.sequences):
                if progress:
                    progress(f"{cand.label}: logits", i, len(cal.sequences))
                llm.reset()
                llm.eval(seq)
                n = len(seq) - 1
                stats.add(ref.rows(fd, ref.offsets[i], n), llm.scores[:n], np.asarray(seq[1:]))
                tops.update((k, int(llm.scores[t["position"] - 1].argmax()))
                            for k, t in enumerate(ref.turn_ends) if t["sequence"] == i)
        finally:
            os.close(fd)
        out.update(stats.summary())
        if behaviour:
            if progress:
                progress(f"{cand.label}: chat template", 0, 0)
            llm.reset()
            out["template"] = check_template(llm, cases).to_dict()
            out["stop"] = check_stop(llm, ref.turn_ends, tops).to_dict()
    finally:
        del llm
        gc.collect()
    out["seconds"], out["threads"] = round(time.monotonic() - t0, 3), n_threads
    return out
