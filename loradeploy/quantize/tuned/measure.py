"""Measured sensitivity (issue 20, step 2): the cheap estimates corrected by KLD measured on calibration text.

The cheap estimate puts every group on one scale (importance-weighted noise-to-signal), but a group's error
does not reach the logits alike: the output matrix's lands on them directly, an early attention matrix's is
damped by every layer after it, an embedding row's is in the residual stream at every layer. So, per tensor
kind, two probes (probe.py): the stock format with that kind one type cheaper, and one type dearer, in up to
four layers spread over the model. All probes, the stock file and the estimate's own recipe come from one
engine pass (each tensor read once, each distinct type quantized once); each is scored by ``scorer.Scorer``
(one batched llama.cpp pass) against the reference log-probabilities. A kind's correction on each side is its
measured KLD change over its estimated error change; the allocator runs again on the error changes so
corrected, no more than one type below the stock one (the range measured).

The search keeps to a time budget (``TimeBudget``: 2x the stock format's quantize time, estimated from the
engine pass itself, beyond what the tuned file's own quantize takes): the stock mix and the estimate are
always scored, probes while time is left (the kinds with the most bytes first; an unmeasured side takes the
median correction), the corrected recipe last. The first pass keeps every (tensor, type) it quantized in a
run-local cache (cache.RunCache, in front of the persistent one, removed at the end), so the corrected
recipe's pass quantizes only the pairs no earlier recipe had: re-scoring costs the groups that changed.

Of the stock mix, the estimate's recipe and the corrected one, the lowest measured KLD is kept among those
whose top-1 agreement is not significantly worse than the stock mix's (a paired McNemar test per position;
the stock mix always qualifies), so on the search's text the tuned file is never worse than the stock format.
The kept file is the one already written and scored: nothing is quantized again.

The reference is the F16 GGUF's own logits, which verify measures within ~1e-6 KLD of the PEFT model.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..engine import quantize_formats
from ..cache import RunCache
from ..importance import Importance
from .allocate import allocate, at_least, options_of
from .probe import corrected_errors, corrections, probes
from .recipe import Recipe, Sizer
from .scorer import Scorer

SEARCH_RATIO = 2.0        # the search takes at most this many times the stock format's quantize (issue 20) ...
SEARCH_FLOOR_S = 5.0      # ... or this long: below it llama.cpp's fixed costs (a load, one pass) decide
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
    skipped: list = field(default_factory=list)                # probes (side:kind) / corrected left out by the budget
    correction_up: dict[str, float] = field(default_factory=dict)   # kind -> the same, one type dearer
    flips: dict[str, list[int]] = field(default_factory=dict)       # candidate -> [top-1 lost, won] vs the stock mix

    def to_dict(self) -> dict:
        return {"kld": {k: round(v, 6) for k, v in self.kld.items()},
                "top1": {k: round(v, 6) for k, v in self.top1.items()}, "chosen": self.chosen,
                "rejected": self.rejected, "correction": {k: float(f"{v:.4g}") for k, v in self.correction.items()},
                "correction_up": {k: float(f"{v:.4g}") for k, v in self.correction_up.items()}, "flips": self.flips,
                "seconds": self.seconds, "text": self.text, "skipped": self.skipped}


GUARD_Z = 1.64     # the top-1 guard's one-sided McNemar test, ~95 %


def flips(stock: np.ndarray, cand: np.ndarray) -> tuple[int, int]:
    """(positions where ``cand`` loses the reference's top-1 the stock mix keeps, where it wins one back)."""
    return int((stock & ~cand).sum()), int((cand & ~stock).sum())


def top1_worse(stock: np.ndarray, cand: np.ndarray, z: float = GUARD_Z) -> bool:
    """Whether ``cand`` agrees with the reference's top-1 at significantly fewer positions than the stock
    mix (per-position booleans, paired): it loses the argmax at ``lost`` positions the stock mix keeps and
    wins it at ``gained`` others; refused when ``lost - gained > z * sqrt(lost + gained)`` (McNemar). An
    argmax flipping between near-tied tokens is noise: one or two such flips with none back pass, three
    do not."""
    lost, gained = flips(stock, cand)
    return lost - gained > z * math.sqrt(lost + gained)


def choose(kld: dict[str, float], top1: dict[str, float],
           agree: Optional[dict[str, np.ndarray]] = None) -> tuple[str, dict[str, str]]:
    """The candidate kept: least KLD among those measured whose top-1 is not significantly worse than the
    stock mix's (``top1_worse`` on the per-position agreement ``agree``; without it, any drop refuses);
    ties: corrected, then estimate. Also {candidate: why refused}."""
    have = [k for k in CHOICES if k in kld]

    def worse(k: str) -> bool:
        if agree is not None and k in agree and "stock" in agree:
            return top1_worse(agree["stock"], agree[k])
        return top1[k] < top1["stock"] - 1e-12

    rejected = {k: f"top-1 {top1[k]:.4f} below the stock mix's {top1['stock']:.4f}" for k in have
                if k != "stock" and worse(k)}
    ok = [k for k in have if k not in rejected]
    return min(ok, key=lambda k: (kld[k], -CHOICES.index(k))), rejected


@dataclass(frozen=True)
class TimeBudget:
    """How long the search may take: ``ratio`` x the stock format's quantize time (estimated from the
    engine pass itself), never under ``floor_s``; ``spent_s`` is what it took before ``refine`` (the plan,
    the reference logits). ``ratio`` None: no limit. The stock mix and the estimate are always scored
    (the guard needs both); probes are scored, largest kinds first, while the rest still fits, with room
    kept for writing and scoring the corrected recipe."""
    ratio: Optional[float] = SEARCH_RATIO
    floor_s: float = SEARCH_FLOOR_S
    spent_s: float = 0.0


def stock_seconds(stats: dict, recipes: dict[str, dict[str, int]], n_elements: dict[str, int],
                  key: str = "stock", skip: set[tuple[str, int]] | None = None) -> float:
    """What writing the recipe ``key`` alone takes, from one engine pass over all ``recipes``: its share
    of the quantizing (per-type seconds per element, over each distinct tensor and type) plus one file's
    share of the rest (reading, writing). ``skip``: (tensor, type) pairs already quantized (a run cache
    holds them), not counted."""
    from ..gguf_out import type_name

    done: dict[str, set[int]] = {}
    for types in recipes.values():
        for g, ty in types.items():
            done.setdefault(g, set()).add(ty)
    per_type: dict[str, int] = {}
    for g, tys in done.items():
        for ty in tys:
            per_type[type_name(ty)] = per_type.get(type_name(ty), 0) + n_elements[g]
    secs = stats.get("quantize_seconds_by_type", {})
    rate = {ty: secs.get(ty, 0.0) / n for ty, n in per_type.items() if n}
    quant = sum(n_elements[g] * rate.get(type_name(ty), 0.0) for g, ty in recipes[key].items()
                if (g, ty) not in (skip or ()))
    rest = max(0.0, float(stats.get("seconds", 0.0)) - sum(secs.values()))
    return quant + rest / max(1, len(recipes))


def pairs(recipes: dict[str, dict[str, int]]) -> set[tuple[str, int]]:
    """The (tensor, type) pairs some recipe of ``recipes`` has."""
    return {(g, ty) for types in recipes.values() for g, ty in types.items()}


def refine(src: Path, plan, scorer: Scorer, *, imatrix: Optional[Importance] = None, threads: int = 1,
           work_dir: Optional[Path] = None, cache=None, out: Optional[Path] = None,
           budget: TimeBudget = TimeBudget()) -> tuple[Recipe, Measured, Optional[str]]:
    """(the recipe to keep for ``plan`` (a TunedPlan), what was measured, its file's sha256 when ``out``
    is given: the file scored is moved there)."""
    t0 = time.perf_counter()
    sizer = Sizer.of(src, imatrix)
    errs, w, stock, base = plan.errors.by_group, plan.weights, plan.stock, plan.recipe.base
    probe_types, est, kinds = probes(plan, sizer)
    size = {k: sum(sizer.cost(g, stock[g]) for g in names) for k, names in kinds.items()}
    # the kinds with the most bytes first, each kind's two sides together
    order = sorted(est, key=lambda p: (-size[p.split(":", 1)[1]], p.split(":", 1)[1], p))
    tmp = Path(tempfile.mkdtemp(prefix="tuned-probes-", dir=work_dir))
    unwritten = order[_affordable(plan, sizer, scorer, budget, threads, len(order)):]
    pending = [k for k in order if k not in unwritten]
    later = pending[disk_room(tmp, plan.size, len(pending)):]         # written in more passes, as the disk frees
    kld: dict[str, float] = {}
    top1: dict[str, float] = {}
    score_s: list[float] = []
    second: dict = {}
    agree: dict[str, np.ndarray] = {}

    def score(k: str, path: Path) -> None:
        t = time.perf_counter()
        r = scorer.score(path)
        kld[k], top1[k], agree[k] = float(r["kld_mean"]), float(r["top1"]), r["agree"]
        score_s.append(time.perf_counter() - t)

    try:
        recipes = {"stock": stock, **({"estimate": plan.recipe.types} if plan.recipe.types != stock else {}),
                   **{k: probe_types[k] for k in pending if k not in later}}
        run_cache = RunCache(tmp / "run-cache", cache)     # later passes quantize only what is new
        files, stats = _write(src, base, recipes, tmp, imatrix, threads, run_cache)
        t_engine = time.perf_counter() - t0
        n_el = {g: sizer.src.by_name[g].n_elements for g in stock}
        t_stock = stock_seconds(stats, recipes, n_el)
        t_own = stock_seconds(stats, recipes, n_el, "estimate") if "estimate" in recipes else t_stock
        # the tuned file's own quantize is not search: it is paid searched or not
        limit = None if budget.ratio is None else max(budget.ratio * t_stock, budget.floor_s) + t_own

        def left() -> float:
            return float("inf") if limit is None else limit - budget.spent_s - (time.perf_counter() - t0)

        def t_pass(new: dict[str, dict[str, int]]) -> float:
            """A later pass foreseen: reading the F16 again, writing its files, quantizing its new pairs."""
            io = max(0.0, float(stats.get("seconds", 0.0)) - sum(stats.get("quantize_seconds_by_type", {}).values()))
            quant = sum(stock_seconds(stats, {**recipes, k: t}, n_el, k, pairs(recipes)) for k, t in new.items())
            return io * (1 + len(new)) / (1 + len(recipes)) + quant

        for k in ("stock", "estimate"):
            if k in files:
                score(k, files[k][0])
        if "estimate" not in files:
            kld["estimate"], top1["estimate"], files["estimate"] = kld["stock"], top1["stock"], files["stock"]
            agree["estimate"] = agree["stock"]
        skipped = list(unwritten)
        corrected_room = t_pass({"corrected": plan.recipe.types})            # room kept for the corrected recipe
        passes = 1
        while True:
            for key in [k for k in pending if k in files]:
                per = max(score_s)
                if left() < per + (corrected_room + per):
                    skipped.append(key)
                else:
                    score(key, files[key][0])
                files.pop(key)[0].unlink()
            if not later:
                break
            batch = {k: probe_types[k] for k in later[:disk_room(tmp, plan.size, len(later), keep=2)]}
            if not batch or left() < t_pass(batch) + len(batch) * max(score_s) + corrected_room + max(score_s):
                skipped += later
                break
            t1 = time.perf_counter()
            new, _ = _write(src, base, batch, tmp, imatrix, threads, run_cache)
            t_engine += time.perf_counter() - t1
            files.update(new)
            recipes.update(batch)
            later, passes = later[len(batch):], passes + 1
        measured = any(k in kld for k in est)
        corr = corrections(kld, est, kinds)
        costs = {g: {ty: sizer.cost(g, ty) for ty in errs[g]} for g in stock}
        alloc = allocate(options_of(costs, corrected_errors(errs, w, stock, corr, sizer), {}, keep=stock),
                         plan.limit - sizer.head - sizer.fixed,
                         start=stock, at_least=at_least(plan.limit, sizer.head, sizer.fixed))
        same = next((k for k in ("stock", "estimate") if alloc.types == recipes.get(k, plan.recipe.types)), None)
        if same is not None:
            kld["corrected"], top1["corrected"], files["corrected"] = kld[same], top1[same], files[same]
            agree["corrected"] = agree[same]
        elif measured and disk_room(tmp, plan.size, 1, keep=0) and \
                left() >= (t_new := t_pass({"corrected": alloc.types})) + max(score_s):
            t1 = time.perf_counter()
            new, again = _write(src, base, {"corrected": alloc.types}, tmp, imatrix, threads, run_cache)
            files.update(new)
            t_engine += time.perf_counter() - t1
            second = {"seconds": round(time.perf_counter() - t1, 3), "foreseen": round(t_new, 3),
                      **{k: again.get(k) for k in ("cached", "computed")}}
            score("corrected", files["corrected"][0])
        chosen, rejected = choose(kld, top1, agree)
        types = {"stock": stock, "estimate": plan.recipe.types, "corrected": alloc.types}[chosen]
        sha = None
        if out is not None:
            path, sha = files[chosen]
            os.replace(path, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t0
    seconds = {"engine": round(t_engine, 3), "score": round(sum(score_s), 3), "scores": len(score_s),
               "total": round(total, 3),
               "stock_estimate": round(t_stock, 3), "own_estimate": round(t_own, 3),
               "limit": None if limit is None else round(limit, 3),
               "before": round(budget.spent_s, 3), "probe_passes": passes, "corrected_pass": second}
    skipped += [] if "corrected" in kld else ["corrected"]
    return Recipe(base, types), Measured(kld, top1, corr["lower"], chosen, rejected, seconds, scorer.describe(),
                                         skipped, corr["raise"],
                                         {k: list(flips(agree["stock"], agree[k])) for k in CHOICES[1:] if k in agree}), sha


DISK_MARGIN = 1 << 30    # bytes the search leaves free on the work folder's disk


def disk_room(folder: Path, file_bytes: int, n: int, free: Optional[int] = None, keep: int = 4) -> int:
    """How many of ``n`` probe files fit on ``folder``'s disk beside the ``keep`` files the search has yet to
    write (first pass: the stock mix, the estimate, the corrected file and the run cache, about one file;
    later passes: the corrected file and the cache's growth) and ``DISK_MARGIN``. A pass's probes are on disk
    together (at 7B, ~4.5 GB each at Q4_K_M); the rest wait for a later pass."""
    free = shutil.disk_usage(folder).free if free is None else free
    return int(max(0, min(n, (free - keep * file_bytes - DISK_MARGIN) // max(1, file_bytes))))


def _affordable(plan, sizer: Sizer, scorer: Scorer, budget: TimeBudget, threads: int, n: int) -> int:
    """How many probes are worth writing, before the engine pass: the stock quantize time foreseen from the
    plan's own timing of each type (CPU seconds per element over the threads), a score taken as long as the
    reference's (an F16 pass, no cheaper than a quantized one); the pass itself, the two scores the guard
    needs and the corrected recipe's write and score come first. The estimate's own quantize is allowed on
    top of the budget (the tuned file costs it searched or not)."""
    if budget.ratio is None:
        return n
    rates = {ty: plan.errors.seconds_per_element(ty) for ty in {*plan.stock.values(), *plan.recipe.types.values()}}
    if any(r is None for r in rates.values()):
        return n

    def foreseen(types: dict[str, int]) -> float:
        return sum(sizer.src.by_name[g].n_elements * rates[ty] for g, ty in types.items()) / max(1, threads)

    hint, own = foreseen(plan.stock), foreseen(plan.recipe.types)
    per = max(scorer.reference_seconds, 1e-3)
    # the corrected pass reads the run cache: its reading and writing, about a quarter of a stock quantize
    room = max(budget.ratio * hint, budget.floor_s) + own - budget.spent_s - (hint + own) - 2 * per - (hint / 4 + per)
    return max(0, min(n, int(room // (per + 0.1 * hint))))


def _write(src: Path, base: str, recipes: dict[str, dict[str, int]], tmp: Path, imatrix, threads: int,
           cache: RunCache) -> dict[str, tuple[Path, str]]:
    """Each recipe's file, all in one engine pass: ({name: (path, sha256)}, the engine's stats)."""
    outs = {k: tmp / f"{k.replace(':', '-')}.gguf" for k in recipes}
    res = quantize_formats(src, outs, threads=threads, cache=cache, imatrix=imatrix,
                           recipes={k: (base, Recipe(base, t).overrides()) for k, t in recipes.items()})
    return {k: (p, res.outputs[k].sha256) for k, p in outs.items()}, res.stats
