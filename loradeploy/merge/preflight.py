"""Before any weight moves: does the adapter fit this base, is there disk and memory for the whole
run? Each failure names what to change. (Whether llama.cpp's converter takes this model is
asked by converter.preflight_beside, beside the merge.)"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..config.tuned import is_tuned, parse_tuned
from ..errors import InputError, MergeError
from ..memory_estimate import Estimate, TensorFacts, convert, merge_library, merge_stream, require
from ..resources import memory_budget_bytes, require_disk
from ..tools.safetensors_io import numel
from .base_identity import SIZE_HINT, compare, dims_named
from .hf_folder import AdapterInfo, BaseModelInfo, load_adapter_info, load_base_info, resolve_base

if TYPE_CHECKING:
    from concurrent.futures import Future

    from ..config import MergeConfig, PerformanceConfig

# bits per weight by format, for the disk estimate of the whole run
BPW = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q5_K_S": 5.5, "Q5_0": 5.5,
       "Q5_1": 6, "Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q4_0": 4.5, "Q4_1": 5, "Q3_K_L": 4.3, "Q3_K_M": 3.9,
       "Q3_K_S": 3.5, "Q2_K": 3.4}


FUSED, TWO_STEP = "fused", "two-step"


@dataclass
class MergePlan:
    base: BaseModelInfo
    adapter: AdapterInfo
    strategy: str        # stream | peft | unsloth
    path: str = TWO_STEP  # fused: merge + convert in one pass (merge/fused.py); two-step: merged folder
    memory: Estimate | None = None  # what this plan's merge (fused: merge + convert) holds at its peak


def abort_on(preflight: "Future | None") -> "Callable[[], None] | None":
    """A check for the merge to call before each tensor: raise the error of the converter preflight
    running beside it as soon as it has failed, instead of finishing a merge nobody can convert."""
    if preflight is None:
        return None

    def check() -> None:
        if preflight.done() and preflight.exception() is not None:
            raise preflight.exception()
    return check


def merge_path(strategy: str, merge: "MergeConfig", stages: Sequence[str]) -> str:
    """Fused for the stream strategy when a convert stage consumes the result and nobody asked to keep
    the merged folder; peft / unsloth (DoRA, extra weights) write a folder first, as the fallback."""
    if strategy == "stream" and not merge.save_merged_hf and "convert" in stages:
        return FUSED
    return TWO_STEP


def check_adapter_against_base(adapter: AdapterInfo, base: BaseModelInfo, configured_base: str,
                               *, allow_mismatch: bool) -> list[str]:
    """Raise InputError when the adapter cannot apply to this base; return warnings otherwise.

    The base is judged by content (base_identity): any folder name, and re-upload aliases, pass when
    config and shapes agree; merge.allow_base_mismatch accepts a name mismatch, never another size."""
    warnings: list[str] = []
    named = adapter.base_name
    verdict = compare(named, configured_base, base.path, base.config, modules=list(adapter.pairs),
                      adapter_cfg=adapter.config)
    if verdict.refuse:
        raise InputError(verdict.refuse, hint=SIZE_HINT)
    if verdict.mismatch:
        if not allow_mismatch:
            raise InputError(verdict.mismatch, hint="fix models.<name>.base_model, or set merge.allow_base_mismatch: "
                                                    "true if it is the same model under another name")
        warnings.append(verdict.mismatch)
    for module, pair in sorted(adapter.pairs.items()):
        wkey = f"{module}.weight"
        if wkey not in base.tensors:
            raise MergeError(f"adapter targets {module}, which the base model {base.path.name} does not have",
                             hint="the adapter was trained for another architecture or base")
        shape = base.tensors[wkey][1]["shape"]
        if len(shape) != 2:
            raise MergeError(f"adapter targets {module} whose weight is {len(shape)}-D; only Linear/Embedding merge")
        r_a, r_b = pair.a_shape[0], pair.b_shape[-1]
        if pair.embedding:
            want_a, want_b = [r_a, shape[0]], [shape[1], r_b]
        else:
            fan = bool(adapter.config.get("fan_in_fan_out"))
            out_f, in_f = (shape[1], shape[0]) if fan else (shape[0], shape[1])
            want_a, want_b = [r_a, in_f], [out_f, r_b]
        if list(pair.a_shape) != want_a or list(pair.b_shape) != want_b or r_a != r_b:
            keys = dims_named(base.config, list(zip(pair.a_shape + pair.b_shape, want_a + want_b)))
            raise InputError(
                f"adapter shape mismatch at {module}: {keys + ' (' if keys else ''}lora_A {pair.a_shape} / lora_B "
                f"{pair.b_shape} do not fit the base weight {shape}{')' if keys else ''}",
                hint="the adapter was trained for another base (different size); " + SIZE_HINT)
        if r_a != adapter.rank(module):
            raise InputError(f"adapter {adapter.path.name}: {module} has rank {r_a} in the weights but "
                             f"{adapter.rank(module)} in adapter_config.json (r / rank_pattern)",
                             hint="the config does not belong to these weights; save them together again")
    for tname, key in adapter.full_tensors.items():
        bshape = base.tensors.get(tname, (None, {"shape": None}))[1]["shape"]
        ashape = adapter.header[key]["shape"]
        if bshape is None:
            if tname == "lm_head.weight" and base.config.get("tie_word_embeddings"):
                continue
            raise MergeError(f"adapter replaces {tname}, which the base model does not have")
        if list(bshape) != list(ashape):
            raise MergeError(f"adapter shape mismatch at {tname}: {ashape} vs base {bshape}",
                             hint="the adapter was trained for another base (or with a resized vocabulary)")
    return warnings


def resolve_strategy(choice: str, adapter: AdapterInfo) -> str:
    if choice == "auto":
        return "stream" if adapter.plain_lora else "peft"
    if choice == "stream" and not adapter.plain_lora:
        raise MergeError("merge.strategy stream handles plain LoRA only (this adapter uses "
                         f"{'DoRA' if adapter.config.get('use_dora') else 'extra weights'})",
                         hint="set merge.strategy: peft (or auto)")
    return choice


def tensor_facts(base: BaseModelInfo, adapter: AdapterInfo | None = None) -> TensorFacts:
    """The sizes the merge and convert estimates need, from the two headers."""
    sizes = {n: numel(i["shape"]) for n, (_, i) in base.tensors.items()}
    touched = [*(f"{m}.weight" for m in adapter.pairs), *adapter.full_tensors] if adapter else []
    return TensorFacts(max(sizes.values(), default=0), max((sizes[n] for n in touched if n in sizes), default=0),
                       sum(sizes.values()))


def merge_memory(strategy: str, facts: TensorFacts, *, path: str = TWO_STEP, fresh: bool = False,
                 preflight_child: bool = False) -> Estimate:
    """What the merge holds at its peak (memory_estimate has the terms): the library strategies (peft,
    unsloth) the whole 16-bit model; the stream merge a few tensors; fused, the merge and the
    converter together. The Ray executor reserves exactly this (``fresh``: in a new worker)."""
    if strategy != "stream":
        return merge_library(facts, fresh=fresh)
    if path == FUSED:
        return convert(facts, fused=True, fresh=fresh)
    return merge_stream(facts, fresh=fresh, preflight_child=preflight_child)


@dataclass(frozen=True)
class RunWrites:
    """What the rest of the run writes beside the merge's own output, for the disk estimate."""
    convert_type: str = "f16"
    verify_positions: "int | Callable[[int], int]" = 0  # verify's positions (or of the parameter count): the
                                               # log-prob memmap holds positions x vocabulary x 4 bytes
    base_gguf: str | None = None               # evaluation's base row, converted beside the merge
    twins: tuple[str, ...] = ()                # plain twins of imatrix quants (verify measures them)
    tensor_cache_bytes: int = 0                # performance.tensor_cache_gb: the most the cache may hold


def verify_positions(w: RunWrites, params: int) -> int:
    """Positions verify scores: a number, or verify.max_tokens: auto resolved for this many parameters."""
    return int(w.verify_positions(params) if callable(w.verify_positions) else w.verify_positions)


def disk_need(base: BaseModelInfo, adapter: AdapterInfo, path: str, formats: Sequence[str], keep_merged: bool,
              w: RunWrites) -> dict[str, int]:
    """Bytes the whole run writes into the work folder (and the state folder's tensor cache), by what."""
    params = base.param_count
    size = {f: int(params * BPW.get(f.upper(), 8) / 8) for f in {*formats, w.convert_type.upper(), *w.twins}}
    touched = {f"{m}.weight" for m in adapter.pairs} | set(adapter.full_tensors)
    untouched = sum(numel(i["shape"]) for n, (_, i) in base.tensors.items() if n not in touched)
    quants = [f for f in formats if f.upper() != w.convert_type.upper()]
    vocab = int(base.config.get("vocab_size") or 0)
    # a tuned search keeps its stock mix, estimate and run cache beside the file (probes: measure.disk_room)
    search = sum(3 * int(params * BPW[_base_of(f)] / 8) for f in quants if is_tuned(f))
    return {"merged folder": params * 2 if path != FUSED or keep_merged else 0,
            "tuned search": search,
            f"{w.convert_type.upper()} GGUF": size[w.convert_type.upper()],
            "quants": sum(size[f] for f in quants) + sum(size[f] for f in w.twins),
            "tensor cache": min(w.tensor_cache_bytes, sum(int(untouched * BPW.get(f, 8) / 8) for f in quants)),
            "verify log-prob memmap": verify_positions(w, params) * vocab * 4,
            "base GGUF": int(params * BPW.get(w.base_gguf.upper(), 8) / 8) if w.base_gguf else 0}


def _base_of(label: str) -> str:
    """The stock format a tuned label is sized after (TUNED-Q4_K_M -> Q4_K_M); a bpw or size budget: at most Q8_0."""
    t = parse_tuned(label)
    return str(t.value) if t.kind == "format" else "Q8_0"


def plan_merge(base_model: str, adapter_dir: Path, *, merge: "MergeConfig", performance: "PerformanceConfig",
               formats: list[str], work_dir: Path, log: logging.Logger, stages: Sequence[str] = (),
               writes: RunWrites = RunWrites(), preflight_child: bool = False) -> MergePlan:
    """Every check that can fail before the merge starts, from headers only. The converter preflight
    is not here: it runs beside the merge (converter.preflight_beside), off the critical path."""
    base_dir = resolve_base(base_model)
    base = load_base_info(base_dir)
    adapter = load_adapter_info(adapter_dir)
    for w in check_adapter_against_base(adapter, base, base_model, allow_mismatch=merge.allow_base_mismatch):
        log.warning(w)
    strategy = resolve_strategy(merge.strategy, adapter)
    path = merge_path(strategy, merge, stages)
    need = disk_need(base, adapter, path, formats, merge.save_merged_hf, writes)
    log.info("disk the run writes: %s", ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in need.items() if v))
    require_disk(work_dir, sum(need.values()), performance.min_free_disk_gb,
                 "the run (" + ", ".join(k for k, v in need.items() if v) + ")")
    mem = merge_memory(strategy, tensor_facts(base, adapter), path=path, preflight_child=preflight_child)
    require(mem, memory_budget_bytes(performance.max_memory_gb))
    return MergePlan(base, adapter, strategy, path, mem)
