"""Choosing a type per group under a file-size budget, and the budget's spelling.

The objective is the sum over groups of ``weight[g] * error[g][type]`` (sensitivity.py), the constraint
the file's exact bytes (recipe.Sizer). Three passes, best result kept:
- Lagrangian: each group's (bytes, error) options reduced to their lower convex hull, then the steps
  with the most error removed per byte taken first while they fit (a step that does not fit is skipped,
  cheaper ones of other groups still go);
- fill: single upgrades on the full option lists while any fits;
- exchange, from the hull's result and from a given start (the stock format's own assignment): swap one
  group down and another up wherever that lowers the error within the budget, until none does. Started
  from the stock assignment it can only improve on it, so at the stock format's size the result is never
  worse than the stock mix by this estimate.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np

from ...config.tuned import parse_tuned

Options = dict[str, list[tuple[int, int, float]]]     # group -> [(type, bytes, weighted error)], by bytes


SIZE_TOL = 0.01       # a budget is met within 1 %: below (1 - SIZE_TOL) x the limit the allocator fills


def at_least(limit: int, head: int, fixed: int) -> int:
    """The bytes the groups should take so the file is within SIZE_TOL under ``limit``."""
    return int(limit * (1 - SIZE_TOL)) - head - fixed


class BudgetError(ValueError):
    """The budget cannot be met, or is spelled wrong."""


@dataclass(frozen=True)
class Budget:
    spec: str                  # as written, e.g. TUNED@Q4_K_M
    kind: str                  # "format" | "bpw" | "bytes"
    value: float | str

    def limit(self, *, head: int, n_elements: int, stock_size: Callable[[str], int]) -> int:
        """The most bytes the tuned file may have. A format's budget is that format's own file size (the
        tuned file is never larger than the stock one it replaces); bits per weight count the tensor
        data as llama.cpp's "quant size ... BPW" does, so the bpw it prints is at most the one asked."""
        if self.kind == "format":
            return stock_size(str(self.value))
        if self.kind == "bpw":
            return head + int(float(self.value) * n_elements / 8)
        return int(self.value)


def parse_budget(spec: str) -> Budget:
    """``TUNED@Q4_K_M`` (that format's size), ``TUNED@4.8bpw``, ``TUNED@4.5GB`` / ``GiB`` / ``MB`` ...
    (config.tuned spells them; ``-`` for ``@`` too)."""
    try:
        t = parse_tuned(spec)
    except ValueError as exc:
        raise BudgetError(str(exc)) from None
    return Budget(spec, t.kind, t.value)


@dataclass
class Allocation:
    types: dict[str, int]
    bytes: int                 # of the groups (padded), not the whole file
    budget: int                # the groups' share of the limit
    error: float               # weighted estimate
    method: str


def options_of(costs: dict[str, dict[int, int]], errors: dict[str, dict[int, float]],
               weights: dict[str, float], keep: Optional[dict[str, int]] = None) -> Options:
    """Each group's types with bytes and weighted error, by bytes; a type that costs more without
    lowering the error is dropped, unless ``keep`` names it for that group."""
    out: Options = {}
    for g, by_type in errors.items():
        w = weights.get(g, 1.0)
        opts = sorted(((ty, costs[g][ty], w * e) for ty, e in by_type.items()), key=lambda o: (o[1], o[2]))
        kept: list[tuple[int, int, float]] = []
        for o in opts:
            if not kept or o[2] < min(k[2] for k in kept) or (keep and keep.get(g) == o[0]):
                kept.append(o)
        out[g] = kept
    return out


def _hull(opts: list[tuple[int, int, float]]) -> list[int]:
    """Indices of the lower convex hull of (bytes, error), cheapest first, each lowering the error."""
    h: list[int] = []
    for i, (_, c, e) in enumerate(opts):
        if h and e >= opts[h[-1]][2]:
            continue
        while len(h) >= 2:
            (_, c1, e1), (_, c2, e2) = opts[h[-2]], opts[h[-1]]
            if (e2 - e1) * (c - c1) >= (e - e1) * (c2 - c1):   # h[-1] lies on or above the chord
                h.pop()
            else:
                break
        h.append(i)
    return h


def _total(opts: Options, pick: dict[str, int]) -> tuple[int, float]:
    return sum(opts[g][i][1] for g, i in pick.items()), sum(opts[g][i][2] for g, i in pick.items())


def _lagrangian(opts: Options, budget: int) -> dict[str, int]:
    hulls = {g: _hull(o) for g, o in opts.items()}
    pos = {g: 0 for g in opts}
    pick = {g: h[0] for g, h in hulls.items()}
    spent = _total(opts, pick)[0]
    heap = []

    def push(g: str) -> None:
        h, k = hulls[g], pos[g]
        if k + 1 < len(h):
            a, b = opts[g][h[k]], opts[g][h[k + 1]]
            heapq.heappush(heap, (-(a[2] - b[2]) / max(1, b[1] - a[1]), g))

    for g in opts:
        push(g)
    while heap:
        _, g = heapq.heappop(heap)
        h, k = hulls[g], pos[g]
        step = opts[g][h[k + 1]][1] - opts[g][h[k]][1]
        if spent + step > budget:
            continue
        spent += step
        pos[g] = k + 1
        pick[g] = h[k + 1]
        push(g)
    return pick


def _fill(opts: Options, pick: dict[str, int], budget: int) -> dict[str, int]:
    pick = dict(pick)
    spent = _total(opts, pick)[0]
    while True:
        best = None
        for g, i in pick.items():
            c0, e0 = opts[g][i][1], opts[g][i][2]
            for j in range(i + 1, len(opts[g])):
                dc, de = opts[g][j][1] - c0, e0 - opts[g][j][2]
                ratio = de / dc if dc > 0 else float("inf")
                if spent + dc <= budget and de > 0 and (best is None or ratio > best[0]):
                    best = (ratio, g, j, dc)
        if best is None:
            return pick
        _, g, j, dc = best
        pick[g], spent = j, spent + dc


def _exchange(opts: Options, pick: dict[str, int], budget: int, max_rounds: int = 10000) -> dict[str, int]:
    """Pairwise swaps (one group to a cheaper option, another to a dearer one) while the error drops."""
    pick = dict(pick)
    names = list(opts)
    for _ in range(max_rounds):
        spent, err = _total(opts, pick)
        slack, tol = budget - spent, -1e-12 * max(err, 1e-300)
        moves = [(gi, g, j, opts[g][j][1] - opts[g][pick[g]][1], opts[g][j][2] - opts[g][pick[g]][2])
                 for gi, g in enumerate(names) for j in range(len(opts[g])) if j != pick[g]]
        if not moves:
            return pick
        gi, dc, de = (np.array([m[k] for m in moves]) for k in (0, 3, 4))
        # any single move that fits and helps, else the best pair
        single = np.where((dc <= slack) & (de < 0), de, 0.0)
        pair = de[:, None] + de[None, :]
        ok = (dc[:, None] + dc[None, :] <= slack) & (gi[:, None] != gi[None, :])
        pair = np.where(ok, pair, 0.0)
        s, p = int(single.argmin()), int(pair.argmin())
        if single[s] >= tol and pair.flat[p] >= tol:
            return pick
        if single[s] <= pair.flat[p]:
            chosen = [moves[s]]
        else:
            a, b = divmod(p, len(moves))
            chosen = [moves[a], moves[b]]
        for _, g, j, _, _ in chosen:
            pick[g] = j
    return pick


def allocate(opts: Options, budget: int, start: Optional[dict[str, int]] = None, *,
             at_least: int = 0) -> Allocation:
    """The assignment of least weighted error whose groups fit in ``budget`` bytes; ``start`` (group ->
    type, e.g. the stock format's) is improved on too, when it fits and each of its types is an option.

    ``at_least``: the bytes the groups should take (a budget is a size, within a tolerance). When one group
    holds so many bytes that no type of it lands between two of the others' steps (a tied embedding: Q5_K
    or Q6_K, nothing between), the best assignment can stop far short; then the largest group below its
    ``start`` type is held at that type and the allocation made again, while that brings the size within
    the tolerance without exceeding the budget (method "...+filled")."""
    alloc = _allocate(opts, budget, start)
    pinned = dict(opts)
    while start is not None and alloc.bytes < at_least:
        below = [(_bytes_of(opts[g], start[g]), g) for g in opts
                 if g in start and _bytes_of(opts[g], alloc.types[g]) < _bytes_of(opts[g], start[g])]
        if not below:
            break
        g = max(below)[1]
        floor = _bytes_of(opts[g], start[g])
        pinned = {**pinned, g: [o for o in pinned[g] if o[1] >= floor]}
        try:
            again = _allocate(pinned, budget, start)
        except BudgetError:
            break
        if again.bytes <= alloc.bytes:
            break
        alloc = replace(again, method=again.method.split("+")[0] + "+filled")
    return alloc


def _bytes_of(opts: list[tuple[int, int, float]], ty: int) -> int:
    return next((c for t, c, _ in opts if t == ty), 0)


def _allocate(opts: Options, budget: int, start: Optional[dict[str, int]] = None) -> Allocation:
    cheapest = sum(o[0][1] for o in opts.values())
    if cheapest > budget:
        raise BudgetError(f"the budget leaves {budget} bytes for the weights; the smallest types need {cheapest}")
    tries = {}
    lag = _lagrangian(opts, budget)
    tries["lagrangian"] = _exchange(opts, _fill(opts, lag, budget), budget)
    if start is not None:
        index = {g: next((i for i, o in enumerate(opts[g]) if o[0] == start.get(g)), None) for g in opts}
        if all(i is not None for i in index.values()) and _total(opts, index)[0] <= budget:
            tries["from-stock"] = _exchange(opts, _fill(opts, index, budget), budget)
    method, pick = min(tries.items(), key=lambda kv: _total(opts, kv[1])[1])
    spent, err = _total(opts, pick)
    assert spent <= budget
    return Allocation({g: opts[g][i][0] for g, i in pick.items()}, spent, budget, err, method)
