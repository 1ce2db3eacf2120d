"""What each heavy stage asks a Ray cluster for, and whether any node can ever give it.

CPUs come from the same thread plan the stage itself uses; memory from the same estimate the stage
checks before it starts (stages.memory, memory_estimate), or ``performance.max_memory_gb`` when set;
a GPU for the merge paths that run on CUDA. A request no node can satisfy would wait in Ray's
queue forever, so it is refused before submission, naming the stage, the request and the largest node.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import ResourceError
from ..resources import GIB, MIB

RAY_WORKER = 512 * MIB     # a Ray worker's own runtime (core worker, gRPC, its imports) before the stage starts
from ..stages.base import StageContext

# Ray's own resource names; everything else in a node's Resources is a custom resource (or a node:IP label).
_BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}


@dataclass(frozen=True)
class Request:
    stage: str
    num_cpus: int
    memory: int                  # bytes
    num_gpus: float = 0
    resources: dict[str, float] = field(default_factory=dict)
    estimate: int = 0            # what the stage was estimated to need (memory is at least this)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``remote_fn.options``."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "memory": self.memory, "num_gpus": self.num_gpus}
        if self.resources:
            opts["resources"] = dict(self.resources)
        return opts

    def describe(self) -> str:
        parts = [f"{self.num_cpus} CPU{'s' if self.num_cpus != 1 else ''}", f"{self.memory / GIB:.2f} GiB memory"]
        if self.num_gpus:
            parts.append(f"{self.num_gpus:g} GPU")
        parts += [f"{k}={v:g}" for k, v in sorted(self.resources.items())]
        return ", ".join(parts)


@dataclass(frozen=True)
class Node:
    """One alive node of the cluster, as ray.nodes() reports it."""

    node_id: str
    name: str
    resources: dict[str, float]

    @property
    def cpus(self) -> float:
        return self.resources.get("CPU", 0.0)

    @property
    def memory(self) -> float:
        return self.resources.get("memory", 0.0)

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0.0)

    def label(self) -> str:
        return f"{self.name} ({self.node_id[:8]})"

    def describe(self) -> str:
        extra = [f"{k}={v:g}" for k, v in sorted(self.resources.items())
                 if k not in _BUILTIN and not k.startswith("node:")]
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.label()}: {self.cpus:g} CPUs, {self.memory / GIB:.2f} GiB memory{gpu}" + \
            (f", {', '.join(extra)}" if extra else "")


def alive_nodes(ray_nodes: Iterable[dict]) -> list[Node]:
    return [Node(n["NodeID"], n.get("NodeName") or n.get("NodeManagerAddress") or "?", dict(n.get("Resources") or {}))
            for n in ray_nodes if n.get("Alive")]


def fits(req: Request, node: Node) -> bool:
    need = {"CPU": req.num_cpus, "memory": req.memory, "GPU": req.num_gpus, **req.resources}
    return all(node.resources.get(k, 0.0) >= v for k, v in need.items() if v)


def check_feasible(req: Request, model: str, nodes: list[Node]) -> None:
    """Raise at once when no node of the cluster could ever run ``req``."""
    if any(fits(req, n) for n in nodes):
        return
    if not nodes:
        raise ResourceError(f"{req.stage} of {model}: the Ray cluster has no alive node",
                            hint="start a head node (ray start --head) or check performance.ray.address")
    # the largest node by what the request is short of, memory first (the usual reason)
    by = {"memory": lambda n: n.memory, "CPU": lambda n: n.cpus, "GPU": lambda n: n.gpus}
    need = {"memory": req.memory, "CPU": req.num_cpus, "GPU": req.num_gpus}
    short = next((k for k in by if need[k] and not any(by[k](n) >= need[k] for n in nodes)), None)
    custom = [k for k, v in req.resources.items() if not any(n.resources.get(k, 0.0) >= v for n in nodes)]
    what = "more than any node of the Ray cluster has" if short or not custom else \
        f"and no node of the Ray cluster offers {', '.join(custom)}"
    largest = max(nodes, key=by[short or "memory"])
    raise ResourceError(f"{req.stage} of {model} asks for {req.describe()}, {what} (largest: {largest.describe()})",
                        hint="lower performance.max_memory_gb / max_cpu_threads, add a bigger node, or run with "
                             "executor: local")


# ----------------------------------------------------------------------------- estimates

def _strategy(ctx: StageContext) -> str:
    from ..merge import load_adapter_info, resolve_strategy
    from ..stages.merge import adapter_dir_for
    return resolve_strategy(ctx.cfg.merge.strategy, load_adapter_info(adapter_dir_for(ctx)))


def _upstream_size(ctx: StageContext, stage: str) -> int:
    return sum(a.size for a in ctx.upstream_artifacts(stage, "gguf"))


def estimate(ctx: StageContext, stage: str, threads: int = 1) -> int:
    """Bytes of RAM ``stage`` is expected to need for this model, in a fresh worker: the estimate the
    stage itself checks before it starts (stages.memory)."""
    from ..stages.memory import estimate as stage_estimate
    est = stage_estimate(ctx, stage, threads)
    if est is not None:
        return est.peak
    # verify: its own estimate from headers (the streamed reference, one GGUF at a time), plus a fresh
    # worker's runtime; never the whole model in float32 (a 7B would reserve 30 GB for a 1.6 GB peak)
    from ..merge.hf_folder import resolve_base
    from ..verify.memory import RUNTIME, stage_peak
    ggufs = [Path(a.path) for a in ctx.upstream_artifacts("quantize", "gguf")]
    return stage_peak(resolve_base(ctx.model.base_model), ggufs, ctx.cfg.verify) + RUNTIME


def cpu_budget(ctx: StageContext, nodes: list[Node]) -> int:
    """Cores one heavy task may use: performance.max_cpu_threads, or a whole node's worth (the largest)."""
    mx = ctx.cfg.performance.max_cpu_threads
    biggest = int(max((n.cpus for n in nodes), default=1)) or 1
    return max(1, min(mx, biggest) if mx else biggest)


def _gpus(ctx: StageContext, nodes: list[Node]) -> float:
    """One GPU for the merge paths that run on CUDA (peft / unsloth on device cuda, or auto on a GPU cluster)."""
    dev = ctx.cfg.merge.device
    if dev == "cpu" or _strategy(ctx) == "stream":
        return 0
    return 1 if dev == "cuda" or any(n.gpus >= 1 for n in nodes) else 0


def request_for(ctx: StageContext, stage: str, nodes: list[Node]) -> Request:
    from ..resources import thread_plan

    cfg = ctx.cfg
    budget = cpu_budget(ctx, nodes)
    gpus: float = 0
    threads = 1
    if stage == "merge":
        cpus = budget
        gpus = _gpus(ctx, nodes)
    elif stage == "convert":
        cpus = 1  # the converter is single-threaded Python; more cores would sit idle
    elif stage == "quantize":
        q = cfg.quantization
        qbudget = min(q.threads, budget) if q.threads else budget
        parallel, each = thread_plan(len(cfg.formats_for(ctx.model_name)), qbudget, q.parallel_formats)
        cpus = threads = parallel * each
    else:
        cpus = min(cfg.verify.threads, budget) if cfg.verify.threads else budget
    need = estimate(ctx, stage, threads)
    mx = cfg.performance.max_memory_gb
    memory = int(mx * GIB) if mx else need
    return Request(stage, cpus, memory, gpus, dict(cfg.performance.ray.stage_resources.get(stage, {})), need)


def remote_overrides(req: Request) -> dict[str, Any]:
    """Performance settings for the task's own copy of the config: the stage plans its threads and
    checks its memory within what Ray reserved for it, not within the node's whole capacity."""
    # the estimate counts a fresh Python; a Ray worker already holds Ray's own runtime beside it
    return {"max_cpu_threads": req.num_cpus, "max_memory_gb": (max(req.memory, req.estimate) + RAY_WORKER) / GIB}


def storage_of(cfg) -> Path:
    """The folder every node sees: performance.ray.storage, else pipeline.work_dir (a local instance)."""
    return Path(cfg.performance.ray.storage or cfg.pipeline.work_dir).resolve()
