"""Tuned quantization (issue 20): a type per tensor group, chosen for this fine-tune under a size budget,
written as llama.cpp's own --tensor-type-file so stock llama-quantize rebuilds the same bytes.

recipe.py (groups, the file format, exact sizes), sensitivity.py (cheap per-group estimates),
allocate.py (budgets and the allocator); ``plan_tuned`` runs the three. measure.py corrects the plan by
measured KLD (probes scored by scorer.py: one batched llama.cpp pass each), build.py makes the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..importance import Importance
from ..rules import FORMATS
from .allocate import Allocation, Budget, BudgetError, allocate, at_least, options_of, parse_budget
from .recipe import (DryRun, Group, Recipe, RecipeError, Sizer, dry_run, file_size, groups, parse_entries, read,
                     stock_types)
from .sensitivity import Deltas, Errors, adapter_deltas, adapter_weights, candidates, quant_errors

__all__ = ["Allocation", "Budget", "BudgetError", "Deltas", "DryRun", "Errors", "Group", "Recipe", "RecipeError",
           "Sizer", "TunedPlan", "adapter_deltas", "allocate", "dry_run", "file_size", "groups", "parse_budget",
           "parse_entries", "plan_tuned", "read", "stock_types"]


@dataclass
class TunedPlan:
    recipe: Recipe
    budget: Budget
    limit: int                         # the most bytes the file may have
    size: int                          # the bytes it will have
    allocation: Allocation
    errors: Errors
    weights: dict[str, float]          # the adapter's multiplier per group
    stock: dict[str, int]              # the base format's own assignment

    def summary(self) -> dict:
        return {"budget": self.budget.spec, "limit_bytes": self.limit, "bytes": self.size, "base": self.recipe.base,
                "method": self.allocation.method, "estimated_error": self.allocation.error,
                "types": self.recipe.counts()}


def _base_for(limit: int, size_of) -> str:
    """The stock format a size-or-bpw budget is labelled with: the largest that fits, else the smallest."""
    sizes = sorted((size_of(f), f) for f in FORMATS)
    fitting = [f for s, f in sizes if s <= limit]
    return fitting[-1] if fitting else sizes[0][1]


def plan_tuned(src_path: Path, spec: str, *, imatrix: Optional[Importance] = None,
               adapter_dir: Optional[Path] = None, strength: float = 1.0, max_rows: int = 64, threads: int = 1,
               low_bits: bool = False) -> TunedPlan:
    """The recipe for ``spec`` (``TUNED@Q4_K_M``, ``TUNED@4.8bpw``, ``TUNED@4.5GB``) on the F16 GGUF
    ``src_path``, by the cheap estimates (quantization error, weighted up where the adapter changed most)."""
    budget = parse_budget(spec)
    sizer = Sizer.of(src_path, imatrix)
    gs = groups(sizer.src)
    stocks: dict[str, dict[str, int]] = {}

    def stock(fmt: str) -> dict[str, int]:
        if fmt not in stocks:
            stocks[fmt] = stock_types(src_path, fmt, imatrix)
        return stocks[fmt]

    limit = budget.limit(head=sizer.head, n_elements=sizer.n_elements(), stock_size=lambda f: sizer.size(stock(f)))
    base = str(budget.value) if budget.kind == "format" else _base_for(limit, lambda f: sizer.size(stock(f)))
    start = stock(base)
    types = {g.name: sorted(set(candidates(g, imatrix is not None, low_bits=low_bits)) | {start[g.name]}) for g in gs}
    errors = quant_errors(sizer.src, gs, types, imatrix, max_rows=max_rows, threads=threads)
    weights = ({g.name: 1.0 for g in gs} if adapter_dir is None else
               adapter_weights(adapter_deltas(adapter_dir, src_path), errors.frob2, strength=strength))
    costs = {g.name: {ty: sizer.cost(g.name, ty) for ty in types[g.name]} for g in gs}
    opts = options_of(costs, errors.by_group, weights, keep=start)
    alloc = allocate(opts, limit - sizer.head - sizer.fixed, start=start,
                     at_least=at_least(limit, sizer.head, sizer.fixed))
    recipe = Recipe(base, alloc.types)
    return TunedPlan(recipe, budget, limit, sizer.size(alloc.types), alloc, errors, weights, start)
