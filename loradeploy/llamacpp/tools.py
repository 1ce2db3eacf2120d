"""Where llama.cpp's own tools are: llama-server, llama-quantize, llama-imatrix, llama-perplexity and
convert_lora_to_gguf.py, built at setup (``python -m loradeploy.llamacpp.build``) from the llama.cpp
source vendored in the installed llama-cpp-python's own sdist, so the tools and the Python bindings
are always one llama.cpp version.

The build lives in the user cache (per llama-cpp-python version, compiler, arch and CPU flags, and
the GPU backend: a CUDA build has its own folder, the CPU one the folder it always had); the venv
holds a link to the build made last, so code and tests that isolate HOME still find the tools.
``LORADEPLOY_LLAMA_CPP_DIR`` points at another build folder (one with a manifest.json).

The GPU backend (``gpu_backend()``): ``LORADEPLOY_LLAMA_GPU=auto`` (the default) builds with CUDA where
an ``nvcc`` and an NVIDIA driver are found, Metal on macOS, else the CPU backend; ``cuda`` or ``cpu``
insist. ``LORADEPLOY_CUDA_ARCHS`` (e.g. ``90``, ``86;90``) names the GPUs to build kernels for; without
it the build is for the GPUs this machine has (cmake's ``native``).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from ..errors import LlamaRuntimeError
from . import runtime

TOOLS = ("llama-server", "llama-quantize", "llama-imatrix", "llama-perplexity")
SCRIPTS = ("convert_lora_to_gguf.py",)
DIR_ENV = "LORADEPLOY_LLAMA_CPP_DIR"
MANIFEST = "manifest.json"
FIX = "run `make setup` (it builds them once per llama-cpp-python version)"
GPU_ENV = "LORADEPLOY_LLAMA_GPU"
ARCHS_ENV = "LORADEPLOY_CUDA_ARCHS"
GPU_CHOICES = ("auto", "cuda", "cpu")
# Where an NVIDIA driver puts libcuda.so.1: the distributions' folders, container runtimes' /usr/local/nvidia,
# WSL's. A toolkit's stubs/ folder holds a link-time stand-in only, never the driver.
DRIVER_LIB_DIRS = ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/wsl/lib", "/usr/lib/x86_64-linux-gnu",
                   "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib/x86_64-linux-gnu", "/lib64")
SMI_PATHS = ("/usr/local/nvidia/bin/nvidia-smi", "/usr/bin/nvidia-smi")
NVCC_DEFAULT = "/usr/local/cuda/bin/nvcc"


def venv_link() -> Path:
    """The link inside the venv to this venv's build (sys.prefix is the venv when it is active)."""
    return Path(sys.prefix) / "share" / "loradeploy" / "llama.cpp"


def compiler_id() -> str:
    """"gcc-12.2.0": part of the cache key, since objects of one compiler are not another's."""
    from ..tools.proc import run

    cc = os.environ.get("CC") or "cc"
    try:
        first = run([cc, "--version"], check=False, timeout=30, what="cc --version").stdout.splitlines()[0]
    except Exception:  # no compiler at all: the build itself will say so with cmake's words
        return "unknown-cc"
    name = "clang" if "clang" in first.lower() else ("gcc" if re.search(r"gcc|\bcc\b", first) else "cc")
    versions = re.findall(r"\b\d+\.\d+(?:\.\d+)?\b", first)
    return f"{name}-{versions[-1] if versions else 'unknown'}"


# ----------------------------------------------------------------------------- the GPU backend

@dataclass(frozen=True)
class Backend:
    """Which llama.cpp backend a build here gets, and for CUDA what cmake needs to know."""
    name: str                          # "cpu" | "cuda" | "metal"
    why: str                           # how it was chosen (setup prints it)
    suffix: str = ""                   # added to the cache key: "" for the builds that existed before
    nvcc: Optional[str] = None         # the real nvcc (a wrapper script followed to it)
    cuda_version: Optional[str] = None  # "13.0"
    archs: Optional[str] = None        # CMAKE_CUDA_ARCHITECTURES: "native", "90", "86;90"
    sms: tuple[str, ...] = ()          # what the kernels are for: ("90",)
    cuda_driver_lib: Optional[str] = None  # the libcuda to link: the toolkit's (stub) or the driver's
    no_vmm: bool = False               # no libcuda at all to link: GGML_CUDA_NO_VMM
    rpath: tuple[str, ...] = ()        # where the CUDA runtime (and a driver the loader would not find) live
    error: Optional[str] = None        # why a CUDA build cannot be configured here

    def label(self) -> str:
        return backend_label({"backend": self.name, "cuda_sms": list(self.sms)})


def _run_out(argv: list[str], timeout: float = 30) -> Optional[str]:
    """stdout of a quick query, or None when it is missing or fails."""
    from ..tools.proc import run

    try:
        cp = run(argv, check=False, timeout=timeout, what=Path(argv[0]).name)
    except Exception:  # not installed, hung: the same as no answer
        return None
    return cp.stdout if cp.returncode == 0 else None


def _real_nvcc(path: str) -> str:
    """A small wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) followed to the nvcc it runs:
    the toolkit's folders are found from that one."""
    p = Path(path).resolve()
    try:
        if p.stat().st_size < 4096 and not p.read_bytes().startswith(b"\x7fELF"):
            for cand in re.findall(r"(/\S+/bin/nvcc)\b", p.read_text(errors="replace")):
                if Path(cand).is_file() and os.access(cand, os.X_OK):
                    return str(Path(cand).resolve())
    except OSError:
        pass
    return str(p)


def find_nvcc() -> Optional[str]:
    """$CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc, PATH's nvcc, /usr/local/cuda/bin/nvcc: the first there."""
    cands = [str(Path(os.environ[v]) / "bin" / "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands += [shutil.which("nvcc") or "", NVCC_DEFAULT]
    found = next((c for c in cands if c and Path(c).is_file() and os.access(c, os.X_OK)), None)
    return _real_nvcc(found) if found else None


def _ldconfig() -> str:
    """The loader's cache (``ldconfig -p``), "" where there is none."""
    return _run_out(["ldconfig", "-p"]) or _run_out(["/sbin/ldconfig", "-p"]) or ""


def find_nvidia_smi() -> Optional[str]:
    return shutil.which("nvidia-smi") or next((p for p in SMI_PATHS if os.access(p, os.X_OK)), None)


def find_driver_lib() -> Optional[str]:
    """The NVIDIA driver's libcuda.so.1 (or a versioned libcuda.so.N...), never a toolkit's stub."""
    dirs = list(DRIVER_LIB_DIRS)
    dirs += [str(Path(m).parent) for m in re.findall(r"libcuda\.so\.1 .*=> (\S+)", _ldconfig())]
    for d in dict.fromkeys(dirs):
        if Path(d).name == "stubs" or not Path(d).is_dir():
            continue
        libs = sorted(Path(d).glob("libcuda.so.*"), key=lambda p: (p.name != "libcuda.so.1", p.name))
        if libs:
            return str(libs[0])
    return None


def _toolkit_lib_dirs(nvcc: str) -> list[Path]:
    root = Path(nvcc).parents[1]
    return [d for d in (root / "lib64", root / "lib", *sorted(root.glob("targets/*/lib"))) if d.is_dir()]


def _cuda_version(nvcc: str) -> Optional[str]:
    m = re.search(r"release (\d+\.\d+)", _run_out([nvcc, "--version"]) or "")
    return m.group(1) if m else None


def _cmake_version() -> tuple[int, ...]:
    m = re.search(r"version (\d+)\.(\d+)", _run_out(["cmake", "--version"]) or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def gpu_compute_caps() -> list[str]:
    """The compute capability of each GPU nvidia-smi lists, as cmake writes it: "9.0" -> "90"."""
    smi = find_nvidia_smi()
    out = _run_out([smi, "--query-gpu=compute_cap", "--format=csv,noheader"]) if smi else None
    caps = re.findall(r"^\s*(\d+)\.(\d+)\s*$", out or "", flags=re.M)
    return sorted({f"{a}{b}" for a, b in caps}, key=int)


def _cuda_backend(nvcc: str, why: str) -> Backend:
    version = _cuda_version(nvcc)
    lib_dirs = _toolkit_lib_dirs(nvcc)
    given = [a for a in re.split(r"[\s,;]+", os.environ.get(ARCHS_ENV, "")) if a]
    archs_env = ";".join(sorted(set(given), key=lambda a: (int(re.match(r"\d*", a).group() or 0), a)))
    caps, error = [], None
    if archs_env:
        archs = archs_env
        sms = tuple(gpu_compute_caps() or ["native"]) if archs == "native" else tuple(archs.split(";"))
    else:
        caps = gpu_compute_caps()
        # native (cmake >= 3.24): the kernels for the GPUs cmake sees, as llama.cpp itself picks them
        archs = ("native" if _cmake_version() >= (3, 24) else ";".join(caps)) if caps else None
        sms = tuple(caps)
        if not caps:
            error = (f"no GPU visible to build CUDA kernels for (nvidia-smi lists none): set {ARCHS_ENV} "
                     f"(e.g. 90 for H100/H200, 89 for L4/RTX 40xx, 86 for A10/RTX 30xx, 80 for A100)")
    # libcuda to link (ggml's VMM pool calls the driver API): the toolkit's own (or its stub), else the
    # driver's libcuda.so.1 itself; a toolkit put together without the stub has none, and cmake finds no
    # unversioned libcuda.so in a driver folder such as /usr/local/nvidia/lib.
    driver = find_driver_lib()
    link = next((str(d / s / "libcuda.so") for d in lib_dirs for s in ("", "stubs") if (d / s / "libcuda.so").exists()),
                driver)
    # the binaries are copied out of the build tree with its RPATH: the CUDA runtime's folder, and the
    # driver's where the loader's cache does not list it
    rpath = [str(d) for d in lib_dirs if any(d.glob("libcudart.so*"))][:1]
    if driver and "libcuda.so.1 " not in _ldconfig():
        rpath.append(str(Path(driver).parent))
    return Backend("cuda", why, f"-cuda{version or 'unknown'}-sm{'_'.join(sms) or 'unknown'}", nvcc, version,
                   archs, sms, link, no_vmm=link is None, rpath=tuple(rpath), error=error)


@lru_cache(maxsize=8)
def _decide(want: str, darwin: bool, _env: tuple) -> Backend:
    if want == "cpu":
        return Backend("cpu", f"{GPU_ENV}=cpu", "-cpu" if darwin else "")
    if darwin:
        if want == "cuda":
            raise LlamaRuntimeError("llama.cpp's CUDA backend is not for macOS",
                                    hint=f"unset {GPU_ENV} (Metal) or set it to cpu")
        return Backend("metal", "macOS: Metal")
    nvcc = find_nvcc()
    if want == "cuda":
        if not nvcc:
            raise LlamaRuntimeError(f"{GPU_ENV}=cuda but no nvcc found (CUDA_HOME, CUDA_PATH, PATH, {NVCC_DEFAULT})",
                                    hint=f"install the CUDA toolkit, or set {GPU_ENV}=cpu")
        return _cuda_backend(nvcc, f"{GPU_ENV}=cuda")
    if not nvcc:
        return Backend("cpu", "no CUDA toolkit (nvcc) found")
    smi, driver = find_nvidia_smi(), find_driver_lib()
    if not (smi or driver):
        return Backend("cpu", f"{nvcc} found but no NVIDIA driver (nvidia-smi, libcuda.so.1)")
    return _cuda_backend(nvcc, f"found {nvcc} and the NVIDIA driver ({smi or driver})")


def gpu_backend(want: Optional[str] = None) -> Backend:
    """The backend a build here gets: ``want`` or $LORADEPLOY_LLAMA_GPU (auto, cuda, cpu; auto when unset)."""
    want = (want or os.environ.get(GPU_ENV) or "auto").strip().lower()
    if want not in GPU_CHOICES:
        raise LlamaRuntimeError(f"{GPU_ENV}={want!r} is not one of {', '.join(GPU_CHOICES)}")
    env = tuple(os.environ.get(v, "") for v in ("PATH", "CUDA_HOME", "CUDA_PATH", ARCHS_ENV))
    return _decide(want, sys.platform == "darwin", env)


def built_backend(manifest: dict) -> str:
    """"cpu", "cuda" or "metal" for a build's manifest (those from before the GPU choice: their options)."""
    if manifest.get("backend"):
        return str(manifest["backend"])
    opts = manifest.get("cmake_options") or []
    return "cuda" if "-DGGML_CUDA=ON" in opts else "metal" if "-DGGML_METAL=ON" in opts else "cpu"


def backend_label(manifest: dict) -> str:
    """"CUDA (sm_90)", "Metal" or "CPU"."""
    name = built_backend(manifest)
    if name == "cuda":
        sms = [s if s == "native" else f"sm_{s}" for s in manifest.get("cuda_sms") or []]
        return f"CUDA ({', '.join(sms) or 'unknown archs'})"
    return {"metal": "Metal"}.get(name, "CPU")


def build_key(backend: Optional[Backend] = None) -> str:
    # GGML_NATIVE builds for this CPU's flags: a cache copied to another CPU must not be reused. The CPU
    # build's key has no backend part (the folders made before the GPU choice stay in use).
    backend = backend or gpu_backend()
    return f"{compiler_id()}-{platform.machine()}-{runtime.fingerprint()['flags_sha256'][:12]}{backend.suffix}"


def build_dir(version: Optional[str] = None, key: Optional[str] = None) -> Path:
    """~/.cache/loradeploy/llama.cpp/<llama-cpp-python version>/<compiler-arch-cpu[-cudaX.Y-smNN]>/"""
    version = version or runtime.llama_cpp_version()
    return runtime.cache_dir() / "llama.cpp" / version / (key or build_key())


def _read_manifest(folder: Path) -> Optional[dict]:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _candidates() -> list[tuple[str, Path]]:
    out = []
    if os.environ.get(DIR_ENV):
        out.append((f"${DIR_ENV}", Path(os.environ[DIR_ENV])))
    out.append(("the venv's link", venv_link()))
    try:
        out.append(("the user cache", build_dir()))
    except LlamaRuntimeError:  # a $LORADEPLOY_LLAMA_GPU no build here could have: the link still counts
        pass
    return out


@lru_cache(maxsize=None)
def _located(installed: str, candidates: tuple[tuple[str, Path], ...]) -> tuple[Path, dict]:
    tried = []
    for where, folder in candidates:
        manifest = _read_manifest(folder)
        if manifest is None:
            tried.append(f"{where} {folder} (no build)")
            continue
        if manifest.get("llama_cpp_python") != installed:
            # Never another llama.cpp than the bindings': formats and flags differ between versions.
            tried.append(f"{where} {folder} (built for llama-cpp-python {manifest.get('llama_cpp_python')})")
            continue
        return folder.resolve(), manifest
    raise LlamaRuntimeError(f"llama.cpp's tools for llama-cpp-python {installed} are not built "
                            f"(looked in {'; '.join(tried)})", hint=FIX)


def locate() -> tuple[Path, dict]:
    """(build folder, manifest) of the tools built for the installed llama-cpp-python."""
    return _located(runtime.llama_cpp_version(), tuple(_candidates()))


def tool(name: str) -> Path:
    """The path of one of llama.cpp's programs (``tool("llama-server")``) or scripts, or a one-line
    error naming what is missing and ``make setup`` as the fix."""
    if name not in TOOLS + SCRIPTS:
        raise LlamaRuntimeError(f"unknown llama.cpp tool {name!r}", hint=f"known: {', '.join(TOOLS + SCRIPTS)}")
    folder, _ = locate()
    path = folder / ("src" if name in SCRIPTS else "bin") / name
    if not path.is_file() or (name in TOOLS and not os.access(path, os.X_OK)):
        raise LlamaRuntimeError(f"{name} is missing from the llama.cpp build at {folder}", hint=FIX)
    return path


def info() -> dict:
    """What was built: llama-cpp-python version, the source's sdist sha256 and build commit label,
    compiler, arch, when and how long it took, and where."""
    folder, manifest = locate()
    return {**manifest, "backend": built_backend(manifest), "backend_label": backend_label(manifest), "dir": str(folder)}


def reported_version(name: str = "llama-server") -> str:
    """The version line the program prints itself (``--version``), e.g. "version: 0 (sdist-832db0699007)"."""
    from ..tools.proc import run

    cp = run([tool(name), "--version"], check=False, timeout=60, what=f"{name} --version")
    lines = [l.strip() for l in cp.stdout.splitlines() if l.strip() and not l.startswith("$ ")]
    return next((l for l in lines if l.startswith("version:")), lines[-1] if lines else "unknown")
