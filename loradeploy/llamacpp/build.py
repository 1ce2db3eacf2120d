"""Build llama.cpp's own tools from the llama.cpp source vendored in the installed llama-cpp-python's
sdist: ``python -m loradeploy.llamacpp.build`` (``make setup`` runs it; safe to run twice).

The sdist is fetched with pip (``pip download --no-binary :all: --no-deps llama-cpp-python==VER``),
its ``vendor/llama.cpp`` kept as the source, then cmake builds the tools (Release; the CPU backend,
Metal on macOS, CUDA where an nvcc and an NVIDIA driver are found: tools.gpu_backend(), overridden by
``LORADEPLOY_LLAMA_GPU=auto|cuda|cpu`` or ``--gpu``; no curl/TLS, no tests or examples, no web UI
download). Everything lives under tools.build_dir(), one folder per backend; a finished build has a
manifest.json (which backend included) and is reused in seconds, and the venv links to it
(tools.venv_link()). A failed CUDA build leaves the CPU build and the venv's link as they were.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from ..errors import LlamaRuntimeError, ProcError
from ..fsutil import atomic_symlink, atomic_write_text, exclusive_lock
from . import runtime, tools

Progress = Callable[[str, Optional[int], Optional[int]], None]


class BuildStepError(ProcError, LlamaRuntimeError):
    """A build command that failed (pip download, cmake): tools.proc.run raises its error_cls with the
    command and its output tail, which a plain LlamaRuntimeError does not take."""


SOURCE_MARK = ".loradeploy-source.json"
NEEDED = ("CMakeLists.txt", "tools/server/CMakeLists.txt", "tools/quantize/CMakeLists.txt",
          "tools/imatrix/CMakeLists.txt", "tools/perplexity/CMakeLists.txt", "convert_lora_to_gguf.py",
          "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py")
# Only what the four tools need. LLAMA_OPENSSL is the TLS switch that replaced the curl one (LLAMA_CURL
# is ignored by this source); the web UI would otherwise be downloaded from a Hugging Face bucket.
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_SERVER=ON",
                 "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 "-DLLAMA_OPENSSL=OFF")
# macOS: Metal on (llama.cpp's default there, written out), its shaders compiled into the static
# binaries rather than looked for beside them. Elsewhere the CPU build, or CUDA (cuda_options).
DARWIN_OPTIONS = ("-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON")


def cuda_options(b: tools.Backend) -> tuple[str, ...]:
    """ggml's CUDA backend (ggml/src/ggml-cuda/CMakeLists.txt): kernels for ``b.archs``; no NCCL (it only
    speeds up splitting one model over several GPUs, and would be one more library to find at run time);
    the libcuda that tools.gpu_backend() found linked by path (a toolkit without its stub has none
    cmake's FindCUDAToolkit would find), or no VMM pool where there is none at all."""
    opts = ["-DGGML_CUDA=ON", *([f"-DCMAKE_CUDA_ARCHITECTURES={b.archs}"] if b.archs else []),
            "-DGGML_CUDA_NCCL=OFF", f"-DCMAKE_CUDA_COMPILER={b.nvcc}"]
    if b.cuda_driver_lib:
        opts.append(f"-DCUDA_cuda_driver_LIBRARY={b.cuda_driver_lib}")
    if b.no_vmm:
        opts.append("-DGGML_CUDA_NO_VMM=ON")
    if b.rpath:
        opts.append(f"-DCMAKE_BUILD_RPATH={';'.join(b.rpath)}")
    return tuple(opts)


def cmake_options(backend: Optional[tools.Backend] = None) -> tuple[str, ...]:
    """The options for ``backend``; None: the platform's own (Metal on macOS, else the CPU)."""
    name = backend.name if backend else ("metal" if sys.platform == "darwin" else "cpu")
    if name == "cuda":
        return CMAKE_OPTIONS + cuda_options(backend)
    if name == "metal":
        return CMAKE_OPTIONS + DARWIN_OPTIONS
    return CMAKE_OPTIONS + (("-DGGML_METAL=OFF",) if sys.platform == "darwin" else ())


def _install_hint() -> str:
    if sys.platform == "darwin":
        return "install Xcode's command line tools (xcode-select --install) and cmake (brew install cmake)"
    return "install cmake and a C++ compiler (Debian: apt-get install cmake g++)"


def _note(progress: Optional[Progress], msg: str, done: Optional[int] = None, total: Optional[int] = None) -> None:
    if progress:
        progress(msg, done, total)


def _locked(folder: Path):
    # Two setups at once (two terminals, parallel CI jobs) build once; the second waits and reuses it.
    return exclusive_lock(folder.parent / f".{folder.name}.lock")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_mark(src: Path) -> Optional[dict]:
    try:
        mark = json.loads((src / SOURCE_MARK).read_text())
    except (OSError, ValueError):
        return None
    missing = [p for p in NEEDED if not (src / p).exists()]
    return mark if isinstance(mark, dict) and not missing else None


def fetch_source(folder: Path, version: str, log_path: Path, progress: Optional[Progress] = None) -> dict:
    """``folder/src`` = vendor/llama.cpp of llama-cpp-python==version's sdist; kept between runs so an
    interrupted build resumes without a new download."""
    from ..tools.proc import run

    src = folder / "src"
    mark = _source_mark(src)
    if mark and mark.get("llama_cpp_python") == version:
        return mark
    _note(progress, f"downloading the llama-cpp-python {version} sdist (pip)")
    with tempfile.TemporaryDirectory(prefix="llama-sdist-", dir=folder.parent) as tmp:
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={version}", "-d", tmp], log_path=log_path, timeout=1800,
            error_cls=BuildStepError, what="pip download llama-cpp-python sdist")
        sdist = next(iter(sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))), None)
        if sdist is None:
            raise LlamaRuntimeError(f"pip download left no llama-cpp-python {version} sdist", hint=f"see {log_path}")
        _note(progress, f"unpacking vendor/llama.cpp from {sdist.name}")
        sha = _sha256(sdist)
        staging = Path(tmp) / "src"
        prefix = None
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if len(parts) > 3 and parts[1:3] == ["vendor", "llama.cpp"]:
                    prefix = "/".join(parts[:3]) + "/"
                    member.name = member.name[len(prefix):]
                    tar.extract(member, staging, filter="data")
        missing = [p for p in NEEDED if not (staging / p).exists()]
        if prefix is None or missing:
            raise LlamaRuntimeError(f"{sdist.name} lacks what the tools need in vendor/llama.cpp: "
                                    f"{', '.join(missing) or 'the whole folder'}")
        # The vendored .git is a pointer into the sdist's missing submodule store; cmake then asks git
        # in vain. The build commit is set explicitly from the sdist's hash instead.
        (staging / ".git").unlink(missing_ok=True)
        mark = {"llama_cpp_python": version, "sdist": sdist.name, "sdist_sha256": sha}
        (staging / SOURCE_MARK).write_text(json.dumps(mark, indent=2))
        if src.exists():
            shutil.rmtree(src)
        staging.rename(src)
    return mark


def _cmake(folder: Path, commit: str, backend: Optional[tools.Backend] = None) -> list[str]:
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    return ["cmake", "-S", str(folder / "src"), "-B", str(folder / "build"), *gen, *cmake_options(backend),
            "-DGGML_CCACHE=OFF", "-DLLAMA_BUILD_NUMBER=0", f"-DLLAMA_BUILD_COMMIT={commit}"]


def _cuda_failed(step: str, exc: LlamaRuntimeError, log_path: Path) -> LlamaRuntimeError:
    return LlamaRuntimeError(f"the CUDA build of llama.cpp's tools failed ({step}: {exc.message})",
                             hint=f"set {tools.GPU_ENV}=cpu to build them for the CPU, or install a complete CUDA "
                                  f"toolkit (nvcc and cuBLAS) that matches the driver; see {log_path}")


_STEP = re.compile(r"^\[\s*(\d+)\s*/\s*(\d+)\]|^\[\s*(\d+)%\]")


def compile_tools(folder: Path, commit: str, jobs: int, log_path: Path, progress: Optional[Progress] = None,
                  backend: Optional[tools.Backend] = None) -> None:
    from ..tools.proc import run

    if not shutil.which("cmake"):
        raise LlamaRuntimeError("cmake is not installed: it builds llama.cpp's tools", hint=_install_hint())
    cuda = backend is not None and backend.name == "cuda"
    if cuda and backend.error:
        raise LlamaRuntimeError(f"cannot build llama.cpp's tools with CUDA: {backend.error}",
                                hint=f"or set {tools.GPU_ENV}=cpu to build them for the CPU")
    _note(progress, f"configuring llama.cpp (cmake, {backend.label() if backend else 'CPU'})")
    try:
        run(_cmake(folder, commit, backend), log_path=log_path, timeout=1800, error_cls=BuildStepError,
            what="cmake configure")
    except LlamaRuntimeError as exc:
        raise _cuda_failed("cmake configure", exc, log_path) if cuda else exc from None

    def on_line(line: str) -> None:
        m = _STEP.match(line.strip())
        if m and m.group(1):
            _note(progress, "compiling llama.cpp", int(m.group(1)), int(m.group(2)))
        elif m:
            _note(progress, "compiling llama.cpp", int(m.group(3)), 100)

    _note(progress, f"compiling llama.cpp with -j{jobs}", 0, None)
    try:
        run(["cmake", "--build", str(folder / "build"), "--config", "Release", f"-j{jobs}", "--target", *tools.TOOLS],
            log_path=log_path, timeout=4 * 3600, error_cls=BuildStepError, what="cmake --build", on_line=on_line)
    except LlamaRuntimeError as exc:
        raise _cuda_failed("cmake --build", exc, log_path) if cuda else exc from None
    bindir = folder / "bin"
    bindir.mkdir(exist_ok=True)
    for name in tools.TOOLS:
        built = folder / "build" / "bin" / name
        if not built.is_file():
            raise LlamaRuntimeError(f"the llama.cpp build produced no {name}", hint=f"see {log_path}")
        tmp = bindir / f".{name}.tmp"
        shutil.copy2(built, tmp)
        tmp.replace(bindir / name)


def link_venv(folder: Path) -> Optional[Path]:
    """Point the venv's link at this build, so a process with another HOME finds the same tools."""
    if sys.prefix == sys.base_prefix:
        return None  # not in a venv: the user cache is where tools.locate() looks
    link = tools.venv_link()
    if link.is_symlink() and link.resolve() == folder.resolve():
        return link
    atomic_symlink(folder.resolve(), link)
    return link


def backend_manifest(backend: tools.Backend) -> dict:
    """What the manifest says of the backend (tools.built_backend / backend_label read it back)."""
    out = {"backend": backend.name, "backend_label": backend.label(), "backend_why": backend.why}
    if backend.name == "cuda":
        out.update(cuda_version=backend.cuda_version, cuda_archs=backend.archs, cuda_sms=list(backend.sms),
                   nvcc=backend.nvcc, cuda_driver_lib=backend.cuda_driver_lib, rpath=list(backend.rpath))
    return out


def ensure_built(*, jobs: int = 2, force: bool = False, progress: Optional[Progress] = None,
                 gpu: Optional[str] = None) -> dict:
    """Build (or reuse) the tools for the installed llama-cpp-python with the backend ``gpu`` (auto, cuda,
    cpu; None: $LORADEPLOY_LLAMA_GPU, else auto); returns the manifest plus ``dir``, ``cached`` and
    ``seconds``."""
    t0 = time.monotonic()
    version = runtime.llama_cpp_version()
    if version == "not installed":
        raise LlamaRuntimeError("llama-cpp-python is not installed: its sdist is the tools' source",
                                hint="run `make setup`")
    backend = tools.gpu_backend(gpu)
    key = tools.build_key(backend)
    folder = tools.build_dir(version, key)
    with _locked(folder):
        manifest = None if force else tools._read_manifest(folder)
        cached = bool(manifest and manifest.get("llama_cpp_python") == version
                      and all((folder / "bin" / t).is_file() for t in tools.TOOLS)
                      and all((folder / "src" / s).is_file() for s in tools.SCRIPTS))
        if not cached:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / tools.MANIFEST).unlink(missing_ok=True)
            log_path = folder / "build.log"
            mark = fetch_source(folder, version, log_path, progress)
            commit = f"sdist-{mark['sdist_sha256'][:12]}"
            compile_tools(folder, commit, jobs, log_path, progress, backend)
            manifest = {"llama_cpp_python": version, "sdist": mark["sdist"], "sdist_sha256": mark["sdist_sha256"],
                        "commit": commit, "build_number": 0, "key": key, "compiler": tools.compiler_id(),
                        **backend_manifest(backend), "cmake_options": list(cmake_options(backend)),
                        "tools": list(tools.TOOLS),
                        "scripts": list(tools.SCRIPTS), "built_at": time.time(),
                        "build_s": round(time.monotonic() - t0, 1), "jobs": jobs}
            atomic_write_text(folder / tools.MANIFEST, json.dumps(manifest, indent=2))
        link = link_venv(folder)
    tools._located.cache_clear()
    return {**manifest, "backend": tools.built_backend(manifest), "backend_label": tools.backend_label(manifest),
            "backend_why": backend.why, "dir": str(folder), "venv_link": str(link) if link else None, "cached": cached,
            "seconds": round(time.monotonic() - t0, 2)}


def main(argv: Optional[list[str]] = None) -> int:
    """The setup step's front end: a rich progress bar on a terminal, plain log lines otherwise."""
    import argparse

    from rich.console import Console

    ap = argparse.ArgumentParser(prog="python -m loradeploy.llamacpp.build", description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", "-j", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="rebuild even when a finished build exists")
    ap.add_argument("--gpu", choices=tools.GPU_CHOICES, default=None,
                    help=f"the GPU backend: auto (CUDA where nvcc and an NVIDIA driver are found, Metal on macOS, "
                         f"else the CPU), cuda or cpu (default: ${tools.GPU_ENV}, else auto)")
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    last = {"msg": None, "pct": -10}

    def plain(msg: str, done: Optional[int], total: Optional[int]) -> None:
        pct = int(100 * done / total) if done is not None and total else None
        if msg != last["msg"] or (pct is not None and pct >= last["pct"] + 10):
            console.print(f"llama.cpp tools: {msg}" + (f" {pct}%" if pct is not None else ""), highlight=False,
                          soft_wrap=True)
            last["msg"], last["pct"] = msg, pct if pct is not None else -10

    try:
        if console.is_terminal:
            from rich.progress import BarColumn, Progress as Bar, SpinnerColumn, TextColumn, TimeElapsedColumn

            with Bar(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                     TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console,
                     transient=True) as bar:
                task = bar.add_task("llama.cpp tools", total=None)
                out = ensure_built(jobs=args.jobs, force=args.force, gpu=args.gpu,
                                   progress=lambda m, d, t: bar.update(task, description=m, completed=d or 0, total=t))
        else:
            out = ensure_built(jobs=args.jobs, force=args.force, gpu=args.gpu, progress=plain)
    except LlamaRuntimeError as exc:
        console.print(f"[red]llama.cpp tools: {exc.one_line()}[/red]")
        return 1
    how = "cached build" if out["cached"] else f"built in {out['build_s']:.0f}s"
    console.print(f"llama.cpp tools for llama-cpp-python {out['llama_cpp_python']} ({out['commit']}): {how}, "
                  f"{out['dir']}" + (f" (linked from {out['venv_link']})" if out["venv_link"] else ""), highlight=False,
                  soft_wrap=True)
    console.print(f"llama.cpp: {out['backend_label']} ({out['backend_why']})", highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
