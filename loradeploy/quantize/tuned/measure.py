"""Measured sensitivity (issue 20, step 2): the cheap estimates corrected by KLD measured on the calibration set.

The cheap estimate puts every group on one scale (importance-weighted noise-to-signal), but a group's error
does not reach the logits alike: the output matrix's lands on them directly, an early attention matrix's is
damped by every layer after it. So, per tensor kind (attn_q ... ffn_down, token_embd, output), one probe:
the stock format with that kind's groups one type cheaper. All probes, the stock file and the estimate's own
recipe come from one engine pass (each tensor read once, each distinct type quantized once); each is scored
with llama.cpp against the reference log-probabilities. A kind's correction is its measured KLD increase over
its estimated error increase; the allocator runs again with the weights so corrected, and of the stock mix,
the estimate's recipe and the corrected one the lowest measured KLD is kept, so the tuned file is never worse
than the stock format on the calibration set.

The reference is the PEFT model's log-probabilities when given (bench), else the F16 GGUF's own logits, which
verify measures within ~1e-6 KLD of it.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..engine import quantize_formats
from ..importance import Importance
from .allocate import allocate, options_of
from .recipe import Recipe, Sizer


@dataclass
class Scorer:
    """Mean KLD (and llama.cpp's other statistics) of any GGUF of this model against fixed log-probabilities."""
    sequences: list[list[int]]
    ref: list[np.ndarray]                  # per sequence: (len - 1, vocab) float32 log-probabilities
    threads: int = 1
    seconds: float = 0.0

    @classmethod
    def of_gguf(cls, gguf: Path, sequences: Sequence[Sequence[int]], threads: int = 1) -> "Scorer":
        seqs = [list(s) for s in sequences if len(s) > 1]
        ref = []
        for x in _logits(gguf, seqs, threads):
            x = x.astype(np.float64)
            m = x.max(axis=1, keepdims=True)
            ref.append((x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))).astype(np.float32))
        return cls(seqs, ref, threads)

    def score(self, gguf: Path) -> dict:
        from ...verify.metrics import PositionStats

        t0 = time.perf_counter()
        stats = PositionStats()
        for seq, ref, x in zip(self.sequences, self.ref, _logits(gguf, self.sequences, self.threads)):
            stats.add(ref, x, np.asarray(seq[1:]))
        self.seconds += time.perf_counter() - t0
        return stats.summary()


def _logits(gguf: Path, seqs: list[list[int]], threads: int):
    from ...llamacpp import runtime

    n_ctx = max(64, -(-max(len(s) for s in seqs) // 32) * 32)
    llm = runtime.load(gguf, n_ctx=n_ctx, n_batch=min(512, n_ctx), logits_all=True, n_threads=threads,
                       n_threads_batch=threads, seed=0)
    try:
        for s in seqs:
            llm.reset()
            llm.eval(s)
            yield np.array(llm.scores[:len(s) - 1], dtype=np.float32)
    finally:
        del llm


@dataclass
class Measured:
    kld: dict[str, float]                  # recipe -> measured mean KLD: stock, estimate, corrected, lower:<kind>
    correction: dict[str, float]           # kind -> measured KLD per unit of estimated error
    chosen: str                            # stock | estimate | corrected
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kld": {k: round(v, 6) for k, v in self.kld.items()}, "chosen": self.chosen,
                "correction": {k: float(f"{v:.4g}") for k, v in self.correction.items()}, "seconds": self.seconds}


def _kind(name: str) -> str:
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def refine(src: Path, plan, scorer: Scorer, *, imatrix: Optional[Importance] = None, threads: int = 1,
           work_dir: Optional[Path] = None, cache=None, reusable=None) -> tuple[Recipe, Measured]:
    """The recipe to keep for ``plan`` (a TunedPlan), by measured KLD (see the module doc)."""
    t0 = time.perf_counter()
    sizer = Sizer.of(src, imatrix)
    errs, w, stock = plan.errors.by_group, plan.weights, plan.stock
    kinds: dict[str, list[str]] = {}
    for g in stock:
        kinds.setdefault(_kind(g), []).append(g)
    probes: dict[str, dict[str, int]] = {}
    est_delta: dict[str, float] = {}
    for kind, names in kinds.items():
        lower, delta = dict(stock), 0.0
        for g in names:
            cheaper = sorted((sizer.cost(g, ty), ty) for ty in errs[g] if sizer.cost(g, ty) < sizer.cost(g, stock[g]))
            if cheaper:
                lower[g] = cheaper[-1][1]
                delta += w[g] * (errs[g][lower[g]] - errs[g][stock[g]])
        if lower != stock and delta > 0:
            probes[f"lower:{kind}"], est_delta[kind] = lower, delta
    base = plan.recipe.base
    recipes = {"stock": stock, "estimate": plan.recipe.types, **probes}
    kld = _score_all(src, base, recipes, scorer, imatrix, threads, work_dir, cache, reusable)
    rise = {k: max(kld[f"lower:{k}"] - kld["stock"], 0.0) / d for k, d in est_delta.items()}
    fallback = float(np.median(list(rise.values()))) if rise else 1.0
    floor = 1e-3 * max(rise.values(), default=1.0) or 1e-12
    correction = {k: max(rise.get(k, fallback), floor) for k in kinds}
    weights = {g: w[g] * correction[_kind(g)] for g in stock}
    costs = {g: {ty: sizer.cost(g, ty) for ty in errs[g]} for g in stock}
    alloc = allocate(options_of(costs, errs, weights, keep=stock), plan.limit - sizer.head - sizer.fixed, start=stock)
    seconds = {"probe": round(time.perf_counter() - t0, 3)}
    if alloc.types not in (stock, plan.recipe.types):
        kld.update(_score_all(src, base, {"corrected": alloc.types}, scorer, imatrix, threads, work_dir, cache,
                              reusable))
    else:
        kld["corrected"] = kld["stock"] if alloc.types == stock else kld["estimate"]
    chosen = min(("stock", "estimate", "corrected"), key=lambda k: (kld[k], k != "corrected"))
    types = {"stock": stock, "estimate": plan.recipe.types, "corrected": alloc.types}[chosen]
    seconds["total"] = round(time.perf_counter() - t0, 3)
    return Recipe(base, types), Measured(kld, correction, chosen, seconds)


def _score_all(src: Path, base: str, recipes: dict[str, dict[str, int]], scorer: Scorer, imatrix, threads: int,
               work_dir: Optional[Path], cache, reusable) -> dict[str, float]:
    """Each recipe's file, written in one engine pass into a scratch folder, scored, removed."""
    with tempfile.TemporaryDirectory(prefix="tuned-probes-", dir=work_dir) as tmp:
        outs = {k: Path(tmp) / f"{i}.gguf" for i, k in enumerate(recipes)}
        quantize_formats(src, outs, threads=threads, cache=cache, reusable=reusable, imatrix=imatrix,
                         recipes={k: (base, Recipe(base, t).overrides()) for k, t in recipes.items()})
        out = {}
        for k, p in outs.items():
            out[k] = float(scorer.score(p)["kld_mean"])
            p.unlink()
        return out
