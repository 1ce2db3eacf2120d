"""One tuned GGUF from an F16 GGUF: plan the recipe, write it beside the GGUF, quantize with it.

The recipe file is ``<gguf minus .gguf>.tensor-types.txt``; the GGUF is what
``llama-quantize --tensor-type-file R [--imatrix I] F16 OUT BASE`` writes, byte for byte: loradeploy's
engine where it can (the imatrix named by the same path string, which ends up in the header), else that
very command. The quantization options of the stock formats (--pure, --output-tensor-type ...) do not
apply: the recipe names every quantizable tensor's type.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from ..cache import TensorCache
from ..engine import quantize_formats, why_unsupported
from ..importance import Importance, load
from ..rules import Unsupported
from . import TunedPlan, plan_tuned
from .measure import TimeBudget, refine
from .recipe import Sizer

SUFFIX = ".tensor-types.txt"
CODE_VERSION = 6     # bump when what chooses a recipe changes: tuned files are made again


def recipe_path(gguf: Path) -> Path:
    """Where the recipe of the tuned GGUF ``gguf`` lives: beside it."""
    gguf = Path(gguf)
    stem = gguf.name[:-5] if gguf.name.endswith(".gguf") else gguf.name
    return gguf.with_name(stem + SUFFIX)


@dataclass
class Built:
    label: str
    path: Path
    recipe: Path
    sha256: Optional[str]          # None when llama-quantize wrote it (the caller hashes)
    engine: str                    # loradeploy | llama.cpp
    plan: TunedPlan
    seconds: dict = field(default_factory=dict)
    note: Optional[str] = None     # why llama-quantize wrote it
    measured: Optional[dict] = None   # measure.Measured.to_dict(): the KLDs that chose the recipe

    def info(self) -> dict:
        """For the run record: the budget, the recipe (file and text), sizes, who wrote it, how long it took."""
        return {**self.plan.summary(), "recipe_file": str(self.recipe), "recipe": self.plan.recipe.text(),
                "engine": self.engine, "engine_note": self.note, "seconds": self.seconds, "measured": self.measured,
                "adapter_weighted": any(w != 1.0 for w in self.plan.weights.values())}


def _importance(imatrix: Optional[Path]) -> tuple[Optional[Importance], Optional[str]]:
    if imatrix is None:
        return None, None
    try:
        return load(imatrix, given_as=str(imatrix)), None
    except Unsupported as exc:          # llama-quantize reads it; the estimates go without it
        return None, str(exc)


def build(src: Path, label: str, dst: Path, *, imatrix: Optional[Path] = None, adapter_dir: Optional[Path] = None,
          threads: int = 1, engine: str = "auto", cache: Optional[TensorCache] = None,
          reusable: Optional[Callable[[str], bool]] = None, log_path: Optional[Path] = None,
          progress: Optional[Callable[[float, float], None]] = None, scorer=None,
          budget: Optional[TimeBudget] = None) -> Built:
    """The tuned GGUF ``label`` (TUNED-Q4_K_M ...) of ``src`` at ``dst``, its recipe beside it.
    ``engine``: auto | loradeploy | llama.cpp, as quantization.engine. ``scorer`` (measure.Scorer): the
    estimates are corrected by measured KLD, and the stock mix kept where nothing measures better, within
    ``budget`` (measure.TimeBudget; default 2x the stock quantize time, the plan and reference counted)."""
    from ...errors import QuantizeError
    from ...fsutil import atomic_output
    from ..imatrix import quantize

    t0 = time.perf_counter()
    im, im_note = _importance(imatrix)
    plan = plan_tuned(src, label, imatrix=im, adapter_dir=adapter_dir, threads=threads)
    seconds, measured = {"plan": round(time.perf_counter() - t0, 3)}, None

    def why_not(plan: TunedPlan) -> Optional[str]:
        if im_note or engine == "llama.cpp":
            return im_note
        return why_unsupported(src, [label], recipes={label: (plan.recipe.base, plan.recipe.overrides())}, imatrix=im)

    why = why_not(plan)
    if engine == "loradeploy" and why:
        raise QuantizeError(f"quantization.engine is loradeploy, but it cannot do {label}: {why}",
                            hint="set quantization.engine: auto to let llama-quantize --tensor-type-file do it")
    if scorer is not None and why is None:     # probes need the engine's one pass
        def measured_recipe(out: Optional[Path]):
            spent = time.perf_counter() - t0 + scorer.reference_seconds     # the plan, the reference
            recipe, m, sha = refine(src, plan, scorer, imatrix=im, threads=threads, work_dir=Path(dst).parent,
                                    cache=cache, out=out,
                                    budget=replace(budget or TimeBudget(), spent_s=spent))
            seconds["measure"] = m.seconds["total"]
            return replace(plan, recipe=recipe, size=Sizer.of(src, im).size(recipe.types)), m.to_dict(), sha

        if engine != "llama.cpp":              # the file kept is the one the search wrote and scored
            with atomic_output(Path(dst)) as tmp:
                plan, measured, sha = measured_recipe(tmp)
            rpath = plan.recipe.write(recipe_path(dst))
            seconds["quantize"] = 0.0
            return Built(label, Path(dst), rpath, sha, "loradeploy", plan, seconds, None, measured)
        plan, measured, _ = measured_recipe(None)
    rpath = plan.recipe.write(recipe_path(dst))
    recipes = {label: (plan.recipe.base, plan.recipe.overrides())}
    t1 = time.perf_counter()
    if engine != "llama.cpp" and why is None:
        with atomic_output(Path(dst)) as tmp:
            res = quantize_formats(src, {label: tmp}, threads=threads, cache=cache, reusable=reusable,
                                   recipes=recipes, imatrix=im, progress=progress)
        seconds["quantize"] = round(time.perf_counter() - t1, 3)
        return Built(label, Path(dst), rpath, res.outputs[label].sha256, "loradeploy", plan, seconds, None, measured)
    quantize(src, Path(dst), plan.recipe.base, threads=threads, imatrix=imatrix, log_path=log_path,
             tensor_type_file=rpath)
    seconds["quantize"] = round(time.perf_counter() - t1, 3)
    return Built(label, Path(dst), rpath, None, "llama.cpp", plan, seconds,
                 why or "quantization.engine is llama.cpp")
