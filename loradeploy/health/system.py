"""The machine under the served models: their processes, disk, memory, and GPUs via NVML.

psutil and pynvml are imported where used: NVML is optional (no GPU, no nvidia-ml-py) and its
absence must turn into a skipped check, not an import error for all of health.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..fsutil import free_bytes
from .results import FAIL, GIB, MIB, PASS, SKIP, WARN, Check, EndpointLike, restart_hint

from ..tools.procmem import Memory, proc_tree_memory

if TYPE_CHECKING:
    from ..config import Config


def process_check(endpoint: EndpointLike) -> Check:
    import psutil

    if not endpoint.pid:
        return Check("system.process", SKIP, "no server process recorded (stopped, or not started by loradeploy)")
    try:
        p = psutil.Process(endpoint.pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            raise psutil.NoSuchProcess(endpoint.pid)
        mem = proc_tree_memory(endpoint.pid)  # the supervisor and the server it runs
        if mem is None:
            rss = p.memory_info().rss
            mem = Memory(rss, rss, 0, "psutil")
    except psutil.NoSuchProcess:
        return Check("system.process", FAIL, f"server process {endpoint.pid} is not running",
                     restart_hint(endpoint))
    except psutil.Error as exc:
        return Check("system.process", SKIP, f"cannot read process {endpoint.pid}: {exc}")
    # anonymous memory is what the model really holds; file pages (its mmap'd weights) are reclaimable
    return Check("system.process", PASS, f"pid {endpoint.pid}, {mem.anon / MIB:.0f} MiB anonymous + "
                 f"{mem.file / MIB:.0f} MiB file pages (RSS {mem.rss / MIB:.0f} MiB)",
                 metrics={"pid": endpoint.pid, **mem.as_mib(), "memory_source": mem.source})


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_checks(paths: dict[str, Path], min_free_gb: float) -> list[Check]:
    """One check per filesystem among ``paths`` (label -> folder)."""
    seen: dict[int, list[str]] = {}
    order: list[tuple[int, Path]] = []
    for label, p in paths.items():
        dev = os.stat(_existing(Path(p))).st_dev
        if dev not in seen:
            seen[dev] = []
            order.append((dev, Path(p)))
        seen[dev].append(label)
    checks = []
    for dev, p in order:
        free = free_bytes(p) / GIB
        what = f"{free:.1f} GiB free at {p} ({', '.join(seen[dev])})"
        metrics = {"path": str(p), "free_gb": round(free, 2), "min_free_gb": min_free_gb}
        if free < min_free_gb:
            checks.append(Check("system.disk", WARN, f"low disk: {what}, under min_free_disk_gb {min_free_gb:g}",
                                "free space: prune old versions (deployment.keep_backups), delete F16 GGUFs "
                                "(quantization.keep_f16: false) or work folders", metrics))
        else:
            checks.append(Check("system.disk", PASS, what, metrics=metrics))
    return checks


def memory_check(min_free_gb: float) -> Check:
    import psutil

    vm = psutil.virtual_memory()
    avail = vm.available / GIB
    metrics = {"available_gb": round(avail, 2), "total_gb": round(vm.total / GIB, 2), "percent_used": vm.percent}
    text = f"{avail:.1f} of {vm.total / GIB:.1f} GiB available"
    if avail < min_free_gb:
        return Check("system.memory", WARN, f"low memory: {text}, under min_free_memory_gb {min_free_gb:g}",
                     "stop other models or processes, or serve a smaller quant", metrics)
    return Check("system.memory", PASS, text, metrics=metrics)


def gpu_checks(max_memory_fraction: float) -> list[Check]:
    try:
        import pynvml
    except ImportError:
        return [Check("system.gpu", SKIP, "skipped: NVML not installed (pip install nvidia-ml-py)")]
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [Check("system.gpu", SKIP, f"skipped: no GPU ({exc})")]
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return [Check("system.gpu", SKIP, "skipped: no GPU")]
        checks = []
        for i in range(count):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            except pynvml.NVMLError:
                util = None
            frac = mem.used / mem.total if mem.total else 0.0
            metrics = {"index": i, "name": name, "memory_used_gb": round(mem.used / GIB, 2),
                       "memory_total_gb": round(mem.total / GIB, 2), "memory_fraction": round(frac, 3),
                       "utilization_pct": util}
            text = (f"GPU {i} {name}: {mem.used / GIB:.1f}/{mem.total / GIB:.1f} GiB used"
                    + (f", {util}% busy" if util is not None else ""))
            if frac > max_memory_fraction:
                checks.append(Check("system.gpu", WARN, f"{text}: over max_gpu_memory_fraction "
                                                         f"{max_memory_fraction:g}",
                                    "free GPU memory: fewer n_gpu_layers, a smaller quant, or stop other jobs",
                                    metrics))
            else:
                checks.append(Check("system.gpu", PASS, text, metrics=metrics))
        return checks
    except pynvml.NVMLError as exc:
        return [Check("system.gpu", SKIP, f"skipped: NVML error ({exc})")]
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def offload_checks(cfg: "Config") -> list[Check]:
    """deployment.llamacpp.n_gpu_layers asks for the GPU: can the server that runs the models use one?
    A llama.cpp built for the CPU alone ignores -ngl (llama-server: "no usable GPU found, --gpu-layers
    option will be ignored") and serves on the CPU; this says so instead of leaving it silent."""
    s = cfg.deployment.llamacpp
    if s.n_gpu_layers == 0:
        return []
    layers = "all layers" if s.n_gpu_layers < 0 else f"{s.n_gpu_layers} layers"
    asked = f"deployment.llamacpp.n_gpu_layers is {s.n_gpu_layers} ({layers} on the GPU)"
    if s.backend == "llama-server":
        from ..errors import LlamaRuntimeError
        from ..llamacpp import tools
        try:
            _, manifest = tools.locate()
        except LlamaRuntimeError as exc:
            return [Check("system.gpu_offload", SKIP, f"skipped: {exc.message}")]
        gpu = tools.built_backend(manifest) != "cpu"
        what = f"llama-server is built for {tools.backend_label(manifest) if gpu else 'the CPU only (no CUDA or Metal)'}"
        fix = (f"rebuild llama.cpp's tools with CUDA: {tools.GPU_ENV}=cuda make setup (needs nvcc and an NVIDIA "
               "driver), or set deployment.llamacpp.n_gpu_layers: 0")
    else:
        try:
            import llama_cpp
            gpu = bool(llama_cpp.llama_supports_gpu_offload())
        except Exception as exc:  # noqa: BLE001 - not installed or a broken build: the server would say so itself
            return [Check("system.gpu_offload", SKIP, f"skipped: llama-cpp-python: {exc}")]
        what = f"the installed llama-cpp-python {'can' if gpu else 'cannot'} offload to a GPU"
        fix = ("set deployment.llamacpp.backend: llama-server (built with CUDA by make setup where nvcc is found), "
               "install a GPU build of llama-cpp-python, or set deployment.llamacpp.n_gpu_layers: 0")
    metrics = {"n_gpu_layers": s.n_gpu_layers, "backend": s.backend, "gpu_backend": gpu}
    if gpu:
        return [Check("system.gpu_offload", PASS, f"{asked}: {what}", metrics=metrics)]
    return [Check("system.gpu_offload", WARN, f"{asked} but {what}: the models run on the CPU", fix, metrics)]


def system_checks(cfg: "Config", endpoints: Sequence[EndpointLike] = ()) -> list[Check]:
    hc = cfg.health_check
    paths = {"models_dir": cfg.deployment.models_dir, "work_dir": cfg.pipeline.work_dir}
    for ep in endpoints:
        if ep.gguf_path:
            paths.setdefault(f"{ep.model} GGUF", Path(ep.gguf_path).parent)
    return [*disk_checks(paths, hc.min_free_disk_gb), memory_check(hc.min_free_memory_gb),
            *gpu_checks(hc.max_gpu_memory_fraction), *offload_checks(cfg)]
