"""Measured sensitivity (issue 20, step 2): the cheap estimates corrected by KLD measured on calibration text.

The cheap estimate puts every group on one scale (importance-weighted noise-to-signal), but a group's error
does not reach the logits alike: the output matrix's lands on them directly, an early attention matrix's is
damped by every layer after it. So, per tensor kind (attn_q ... ffn_down, token_embd, output), one probe:
the stock format with that kind one type cheaper in up to ``PROBE_LAYERS`` layers spread over the model (the
measured rise and the estimated one are over the same groups, so their ratio holds for the kind). All probes,
the stock file and the estimate's own recipe come from one engine pass (each tensor read once, each distinct
type quantized once); each is scored by ``scorer.Scorer`` (one batched llama.cpp pass over a few hundred
tokens) against the reference log-probabilities. A kind's correction is its measured KLD increase over its
estimated error increase; the allocator runs again with the weights so corrected.

Of the stock mix, the estimate's recipe and the corrected one, the lowest measured KLD is kept among those
whose top-1 agreement is no worse than the stock mix's (the stock mix always qualifies), so on the search's
text the tuned file is never worse than the stock format. The kept file is the one already written and
scored: nothing is quantized twice.

The reference is the F16 GGUF's own logits, which verify measures within ~1e-6 KLD of the PEFT model.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..engine import quantize_formats
from ..importance import Importance
from .allocate import allocate, options_of
from .recipe import Recipe, Sizer
from .scorer import Scorer

PROBE_LAYERS = 4          # layers of a kind lowered in its probe, spread evenly
CHOICES = ("stock", "estimate", "corrected")


@dataclass
class Measured:
    kld: dict[str, float]                  # recipe -> measured mean KLD: stock, estimate, corrected, lower:<kind>
    top1: dict[str, float]
    correction: dict[str, float]           # kind -> measured KLD per unit of estimated error
    chosen: str                            # stock | estimate | corrected
    rejected: dict[str, str] = field(default_factory=dict)    # candidate -> why the guard refused it
    seconds: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)                   # Scorer.describe(): what was scored on

    def to_dict(self) -> dict:
        return {"kld": {k: round(v, 6) for k, v in self.kld.items()},
                "top1": {k: round(v, 4) for k, v in self.top1.items()}, "chosen": self.chosen,
                "rejected": self.rejected, "correction": {k: float(f"{v:.4g}") for k, v in self.correction.items()},
                "seconds": self.seconds, "text": self.text}


def _kind(name: str) -> str:
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def _spread(names: list[str], n: int) -> list[str]:
    if len(names) <= n:
        return names
    return [names[i] for i in np.unique(np.linspace(0, len(names) - 1, n).round().astype(int))]


def probes(plan, sizer: Sizer, layers: int = PROBE_LAYERS) -> tuple[dict[str, dict[str, int]], dict[str, float],
                                                                     dict[str, list[str]]]:
    """({lower:<kind>: types}, {kind: estimated error increase}, {kind: its groups})."""
    errs, w, stock = plan.errors.by_group, plan.weights, plan.stock
    kinds: dict[str, list[str]] = {}
    for g in stock:
        kinds.setdefault(_kind(g), []).append(g)
    out, est = {}, {}
    for kind, names in kinds.items():
        lower, delta = dict(stock), 0.0
        for g in _spread(names, layers):
            cheaper = sorted((sizer.cost(g, ty), ty) for ty in errs[g] if sizer.cost(g, ty) < sizer.cost(g, stock[g]))
            if cheaper:
                lower[g] = cheaper[-1][1]
                delta += w[g] * (errs[g][lower[g]] - errs[g][stock[g]])
        if lower != stock and delta > 0:
            out[f"lower:{kind}"], est[kind] = lower, delta
    return out, est, kinds


def choose(kld: dict[str, float], top1: dict[str, float]) -> tuple[str, dict[str, str]]:
    """The candidate kept: least KLD among those with top-1 no worse than the stock mix's (ties: corrected,
    then estimate); {candidate: why refused}."""
    rejected = {k: f"top-1 {top1[k]:.4f} below the stock mix's {top1['stock']:.4f}" for k in CHOICES
                if k != "stock" and top1[k] < top1["stock"]}
    ok = [k for k in CHOICES if k not in rejected]
    return min(ok, key=lambda k: (kld[k], -CHOICES.index(k))), rejected


def refine(src: Path, plan, scorer: Scorer, *, imatrix: Optional[Importance] = None, threads: int = 1,
           work_dir: Optional[Path] = None, cache=None, reusable=None,
           out: Optional[Path] = None) -> tuple[Recipe, Measured, Optional[str]]:
    """(the recipe to keep for ``plan`` (a TunedPlan), what was measured, its file's sha256 when ``out``
    is given: the file scored is moved there)."""
    t0 = time.perf_counter()
    sizer = Sizer.of(src, imatrix)
    errs, w, stock, base = plan.errors.by_group, plan.weights, plan.stock, plan.recipe.base
    lowered, est_delta, kinds = probes(plan, sizer)
    tmp = Path(tempfile.mkdtemp(prefix="tuned-probes-", dir=work_dir))
    try:
        recipes = {"stock": stock, **({"estimate": plan.recipe.types} if plan.recipe.types != stock else {}),
                   **lowered}
        files = _write(src, base, recipes, tmp, imatrix, threads, cache, reusable)
        t_engine = time.perf_counter() - t0
        kld, top1 = {}, {}
        for k, (p, _) in files.items():
            r = scorer.score(p)
            kld[k], top1[k] = float(r["kld_mean"]), float(r["top1"])
            if k.startswith("lower:"):
                p.unlink()
        if "estimate" not in files:
            kld["estimate"], top1["estimate"], files["estimate"] = kld["stock"], top1["stock"], files["stock"]
        rise = {k: max(kld[f"lower:{k}"] - kld["stock"], 0.0) / d for k, d in est_delta.items()}
        fallback = float(np.median(list(rise.values()))) if rise else 1.0
        floor = 1e-3 * max(rise.values(), default=1.0) or 1e-12
        correction = {k: max(rise.get(k, fallback), floor) for k in kinds}
        weights = {g: w[g] * correction[_kind(g)] for g in stock}
        costs = {g: {ty: sizer.cost(g, ty) for ty in errs[g]} for g in stock}
        alloc = allocate(options_of(costs, errs, weights, keep=stock), plan.limit - sizer.head - sizer.fixed,
                         start=stock)
        same = next((k for k in ("stock", "estimate") if alloc.types == recipes.get(k, plan.recipe.types)), None)
        if same is not None:
            kld["corrected"], top1["corrected"], files["corrected"] = kld[same], top1[same], files[same]
        else:
            t1 = time.perf_counter()
            files.update(_write(src, base, {"corrected": alloc.types}, tmp, imatrix, threads, cache, reusable))
            t_engine += time.perf_counter() - t1
            r = scorer.score(files["corrected"][0])
            kld["corrected"], top1["corrected"] = float(r["kld_mean"]), float(r["top1"])
        chosen, rejected = choose(kld, top1)
        types = {"stock": stock, "estimate": plan.recipe.types, "corrected": alloc.types}[chosen]
        sha = None
        if out is not None:
            path, sha = files[chosen]
            os.replace(path, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t0
    seconds = {"engine": round(t_engine, 3), "score": round(total - t_engine, 3), "total": round(total, 3)}
    return Recipe(base, types), Measured(kld, top1, correction, chosen, rejected, seconds, scorer.describe()), sha


def _write(src: Path, base: str, recipes: dict[str, dict[str, int]], tmp: Path, imatrix, threads: int, cache,
           reusable) -> dict[str, tuple[Path, str]]:
    """Each recipe's file, all in one engine pass: {name: (path, sha256)}."""
    outs = {k: tmp / f"{k.replace(':', '-')}.gguf" for k in recipes}
    res = quantize_formats(src, outs, threads=threads, cache=cache, reusable=reusable, imatrix=imatrix,
                           recipes={k: (base, Recipe(base, t).overrides()) for k, t in recipes.items()})
    return {k: (p, res.outputs[k].sha256) for k, p in outs.items()}
