"""Where llama.cpp's own tools are: llama-server, llama-quantize, llama-imatrix, llama-perplexity and
convert_lora_to_gguf.py, built at setup (``python -m loradeploy.llamacpp.build``) from the llama.cpp
source vendored in the installed llama-cpp-python's own sdist, so the tools and the Python bindings
are always one llama.cpp version.

The build lives in the user cache (per llama-cpp-python version, compiler, arch and CPU flags); the
venv holds a link to it, so code and tests that isolate HOME still find the tools.
``LORADEPLOY_LLAMA_CPP_DIR`` points at another build folder (one with a manifest.json).
"""
from __future__ import annotations

import json
import os
import platform
import re
import sys
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


def build_key() -> str:
    # GGML_NATIVE builds for this CPU's flags: a cache copied to another CPU must not be reused.
    return f"{compiler_id()}-{platform.machine()}-{runtime.fingerprint()['flags_sha256'][:12]}"


def build_dir(version: Optional[str] = None, key: Optional[str] = None) -> Path:
    """~/.cache/loradeploy/llama.cpp/<llama-cpp-python version>/<compiler-arch-cpu>/"""
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
    out.append(("the user cache", build_dir()))
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
    return {**manifest, "dir": str(folder)}


def reported_version(name: str = "llama-server") -> str:
    """The version line the program prints itself (``--version``), e.g. "version: 0 (sdist-832db0699007)"."""
    from ..tools.proc import run

    cp = run([tool(name), "--version"], check=False, timeout=60, what=f"{name} --version")
    lines = [l.strip() for l in cp.stdout.splitlines() if l.strip() and not l.startswith("$ ")]
    return next((l for l in lines if l.startswith("version:")), lines[-1] if lines else "unknown")
