"""The measured step's probes and what they correct (measure.py runs them).

Per tensor kind (attn_q ... ffn_down, token_embd, output) two probes: the stock mix with that kind one type
cheaper (``lower:<kind>``) and one type dearer (``raise:<kind>``) in up to ``PROBE_LAYERS`` layers spread over
the model. Each probe's measured KLD change over its estimated error change is the kind's sensitivity on that
side of the stock type: a kind can lose little going down and gain much going up (token_embd of a small model),
or the reverse, and one ratio for both misplaces bits.

The corrected allocation works on error *changes* from the stock type, scaled per kind and side, and only
within what was measured below the stock type (``trusted``): one step down at most, any step up. Extrapolating
a flat (noise-level) downward probe further down took kinds to Q3_K and made the corrected recipe worse than
the stock mix.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .recipe import Sizer, evenly, kind_of

PROBE_LAYERS = 4          # layers of a kind changed in its probe, spread evenly
SIDES = ("lower", "raise")


def one_step(g: str, types, stock: int, sizer: Sizer, side: str = "lower") -> Optional[int]:
    """The type next to ``stock`` for group ``g`` on ``side``: the dearest cheaper one (lower) or the cheapest
    dearer one (raise); None when there is none."""
    here = sizer.cost(g, stock)
    if side == "lower":
        near = sorted((sizer.cost(g, ty), ty) for ty in types if sizer.cost(g, ty) < here)
        return near[-1][1] if near else None
    near = sorted((sizer.cost(g, ty), ty) for ty in types if sizer.cost(g, ty) > here)
    return near[0][1] if near else None


def trusted(errs: dict[str, dict[int, float]], stock: dict[str, int], sizer: Sizer) -> dict[str, dict[int, float]]:
    """Each group's types no cheaper than one step below its stock type (the range the probes measured)."""
    out = {}
    for g, by_type in errs.items():
        low = one_step(g, by_type, stock[g], sizer)
        floor = sizer.cost(g, stock[g] if low is None else low)
        out[g] = {ty: e for ty, e in by_type.items() if sizer.cost(g, ty) >= floor}
    return out


def kinds_of(stock: dict[str, int]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for g in stock:
        kinds.setdefault(kind_of(g), []).append(g)
    return kinds


def probes(plan, sizer: Sizer, layers: int = PROBE_LAYERS,
           sides: tuple[str, ...] = SIDES) -> tuple[dict[str, dict[str, int]], dict[str, float], dict[str, list[str]]]:
    """({<side>:<kind>: types}, {<side>:<kind>: estimated error change, > 0}, {kind: its groups})."""
    errs, w, stock = plan.errors.by_group, plan.weights, plan.stock
    kinds = kinds_of(stock)
    out, est = {}, {}
    for side in sides:
        for kind, names in kinds.items():
            moved, delta = dict(stock), 0.0
            for g in (names[i] for i in evenly(len(names), layers)):
                if (ty := one_step(g, errs[g], stock[g], sizer, side)) is not None:
                    moved[g] = ty
                    delta += w[g] * abs(errs[g][ty] - errs[g][stock[g]])
            if moved != stock and delta > 0:
                out[f"{side}:{kind}"], est[f"{side}:{kind}"] = moved, delta
    return out, est, kinds


def corrections(kld: dict[str, float], est: dict[str, float], kinds) -> dict[str, dict[str, float]]:
    """{side: {kind: measured KLD change per unit of estimated error change}}. A probe the budget left out
    takes its side's median; a change within the noise (none, or the wrong way) a floor of 1e-3 x the side's
    largest, so nothing is free."""
    out = {}
    for side in SIDES:
        sign = 1.0 if side == "lower" else -1.0
        got = {k: max(sign * (kld[f"{side}:{k}"] - kld["stock"]), 0.0) / est[f"{side}:{k}"] for k in kinds
               if f"{side}:{k}" in kld}
        fallback = float(np.median(list(got.values()))) if got else None
        floor = 1e-3 * max(got.values(), default=1.0) or 1e-12
        out[side] = {k: max(got.get(k, fallback if fallback is not None else 1.0), floor) for k in kinds}
    if not any(f"raise:{k}" in kld for k in kinds):      # nothing measured upward: the downward ratios
        out["raise"] = dict(out["lower"])
    return out


def corrected_errors(errs: dict[str, dict[int, float]], weights: dict[str, float], stock: dict[str, int],
                     corr: dict[str, dict[str, float]], sizer: Sizer) -> dict[str, dict[int, float]]:
    """Per group and trusted type: the error change from the stock type, weighted, scaled by the kind's
    correction on that side (the allocator minimises the sum; a group's constant does not matter)."""
    out = {}
    for g, by_type in trusted(errs, stock, sizer).items():
        k, e0, here = kind_of(g), by_type[stock[g]], sizer.cost(g, stock[g])
        out[g] = {ty: weights[g] * corr["lower" if sizer.cost(g, ty) < here else "raise"][k] * (e - e0)
                  for ty, e in by_type.items()}
    return out
