"""The GPU backend choice of llama.cpp's tools build (llamacpp.tools.gpu_backend, build.cmake_options): auto,
the LORADEPLOY_LLAMA_GPU override, the cache key per backend (the CPU build's unchanged, so a machine that
has one never rebuilds it), cmake's argv per backend, a CUDA failure's one line, and health's warning when
n_gpu_layers asks for a GPU the built llama-server cannot use. A fake nvcc / nvidia-smi / driver stand in
for CUDA; nothing here compiles llama.cpp."""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from loradeploy.errors import LlamaRuntimeError
from loradeploy.llamacpp import build, runtime, tools

FLAGS = "fc7df03f53a7aaaa"


def _exe(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A machine with no CUDA at all: an empty PATH (plus cmake's folder), no driver folders, no ldconfig
    answer, a fixed compiler/CPU key. ``machine.toolkit()`` / ``machine.driver()`` add the fakes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    for v in ("CUDA_HOME", "CUDA_PATH", tools.GPU_ENV, tools.ARCHS_ENV):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(tools, "DRIVER_LIB_DIRS", ())
    monkeypatch.setattr(tools, "SMI_PATHS", ())
    monkeypatch.setattr(tools, "NVCC_DEFAULT", str(tmp_path / "no-cuda" / "bin" / "nvcc"))
    monkeypatch.setattr(tools, "_ldconfig", lambda: "")
    monkeypatch.setattr(tools, "_cmake_version", lambda: (3, 25))
    monkeypatch.setattr(tools, "compiler_id", lambda: "gcc-12.2.0")
    monkeypatch.setattr(runtime, "fingerprint", lambda: {"flags_sha256": FLAGS})
    monkeypatch.setattr(runtime, "llama_cpp_version", lambda: "0.3.36")
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    tools._decide.cache_clear()

    class M:
        path = tmp_path
        bin = bin_dir

        @staticmethod
        def toolkit(root: Path = tmp_path / "cuda-13.0", stub: bool = False) -> Path:
            nvcc = _exe(root / "bin" / "nvcc", 'echo "Cuda compilation tools, release 13.0, V13.0.48"')
            (root / "lib64").mkdir(parents=True, exist_ok=True)
            (root / "lib64" / "libcudart.so.13").write_bytes(b"")
            if stub:
                (root / "lib64" / "stubs").mkdir(exist_ok=True)
                (root / "lib64" / "stubs" / "libcuda.so").write_bytes(b"")
            return nvcc

        @staticmethod
        def driver(smi: bool = True, lib: bool = True, caps: str = "9.0") -> None:
            if smi:
                _exe(bin_dir / "nvidia-smi", f'echo "{caps}"')
            if lib:
                d = tmp_path / "nvidia" / "lib"
                d.mkdir(parents=True, exist_ok=True)
                (d / "libcuda.so.580.159.04").write_bytes(b"")
                (d / "libcuda.so.1").symlink_to("libcuda.so.580.159.04")
                monkeypatch.setattr(tools, "DRIVER_LIB_DIRS", (str(d),))

    yield M
    tools._decide.cache_clear()


CPU_KEY = f"gcc-12.2.0-{__import__('platform').machine()}-{FLAGS[:12]}"


# ----------------------------------------------------------------------------- the decision

def test_auto_without_nvcc_builds_for_the_cpu(machine):
    b = tools.gpu_backend()
    assert (b.name, b.suffix, b.label()) == ("cpu", "", "CPU")
    assert "nvcc" in b.why


def test_auto_with_nvcc_but_no_driver_builds_for_the_cpu(machine, monkeypatch):
    # this very machine: a CUDA toolkit (nvcc on PATH) and no NVIDIA driver
    nvcc = machine.toolkit()
    monkeypatch.setenv("PATH", f"{nvcc.parent}{os.pathsep}{machine.bin}")
    b = tools.gpu_backend()
    assert b.name == "cpu" and "no NVIDIA driver" in b.why


@pytest.mark.parametrize("smi, lib", [(True, True), (True, False), (False, True)])
def test_auto_with_nvcc_and_a_driver_builds_with_cuda(machine, monkeypatch, smi, lib):
    nvcc = machine.toolkit()
    machine.driver(smi=smi, lib=lib)
    monkeypatch.setenv("PATH", f"{nvcc.parent}{os.pathsep}{machine.bin}")
    monkeypatch.setenv(tools.ARCHS_ENV, "90")  # the fake driver without nvidia-smi shows no GPU
    b = tools.gpu_backend()
    assert b.name == "cuda" and b.nvcc == str(nvcc.resolve()) and b.cuda_version == "13.0"
    assert b.sms == ("90",) and b.label() == "CUDA (sm_90)" and b.suffix == "-cuda13.0-sm90"


def test_nvcc_found_through_cuda_home_the_default_folder_and_a_wrapper(machine, monkeypatch):
    machine.driver()
    nvcc = machine.toolkit(machine.path / "opt" / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(machine.path / "opt" / "cuda"))
    assert tools.find_nvcc() == str(nvcc.resolve())
    monkeypatch.delenv("CUDA_HOME")
    assert tools.find_nvcc() is None
    monkeypatch.setattr(tools, "NVCC_DEFAULT", str(nvcc))
    assert tools.find_nvcc() == str(nvcc.resolve())
    # a wrapper on PATH (as on the GPU image: exec /usr/local/cuda-13.0/bin/nvcc "$@") is followed to the toolkit
    monkeypatch.setattr(tools, "NVCC_DEFAULT", str(machine.path / "none"))
    _exe(machine.bin / "nvcc", f'exec {nvcc} "$@"')
    assert tools.find_nvcc() == str(nvcc.resolve())
    tools._decide.cache_clear()
    assert tools.gpu_backend().rpath[0] == str(nvcc.parents[1] / "lib64")


def test_env_override(machine, monkeypatch):
    nvcc = machine.toolkit()
    machine.driver()
    monkeypatch.setenv("PATH", f"{nvcc.parent}{os.pathsep}{machine.bin}")
    assert tools.gpu_backend().name == "cuda"
    monkeypatch.setenv(tools.GPU_ENV, "cpu")
    assert tools.gpu_backend().name == "cpu" and tools.gpu_backend().why == f"{tools.GPU_ENV}=cpu"
    monkeypatch.setenv(tools.GPU_ENV, "CUDA")
    assert tools.gpu_backend().name == "cuda"
    assert tools.gpu_backend("cpu").name == "cpu"  # build.py's --gpu wins over the environment
    monkeypatch.setenv(tools.GPU_ENV, "rocm")
    with pytest.raises(LlamaRuntimeError, match="not one of auto, cuda, cpu"):
        tools.gpu_backend()


def test_cuda_insisted_on_without_nvcc_is_one_line(machine, monkeypatch):
    monkeypatch.setenv(tools.GPU_ENV, "cuda")
    with pytest.raises(LlamaRuntimeError) as exc:
        tools.gpu_backend()
    assert "no nvcc found" in exc.value.one_line() and f"{tools.GPU_ENV}=cpu" in exc.value.one_line()
    # tools.locate() still finds the venv's link: a wish no build here can fulfil skips only the cache
    assert [w for w, _ in tools._candidates()] == ["the venv's link"]


def test_archs_native_from_the_visible_gpus_else_the_env_else_an_error(machine, monkeypatch):
    nvcc = machine.toolkit()
    machine.driver(caps="9.0\n8.6\n9.0")
    monkeypatch.setenv("PATH", f"{nvcc.parent}{os.pathsep}{machine.bin}")
    b = tools.gpu_backend()
    assert (b.archs, b.sms, b.error) == ("native", ("86", "90"), None)
    assert b.label() == "CUDA (sm_86, sm_90)" and b.suffix == "-cuda13.0-sm86_90"
    monkeypatch.setattr(tools, "_cmake_version", lambda: (3, 22))  # no "native" before cmake 3.24
    tools._decide.cache_clear()
    assert tools.gpu_backend().archs == "86;90"
    monkeypatch.setenv(tools.ARCHS_ENV, "90, 80")
    b = tools.gpu_backend()
    assert (b.archs, b.sms, b.suffix) == ("80;90", ("80", "90"), "-cuda13.0-sm80_90")
    monkeypatch.delenv(tools.ARCHS_ENV)
    (machine.bin / "nvidia-smi").unlink()   # a driver but no GPU to see
    tools._decide.cache_clear()
    b = tools.gpu_backend()
    assert b.name == "cuda" and b.archs is None and tools.ARCHS_ENV in b.error


# ----------------------------------------------------------------------------- the cache key

def test_cpu_cache_path_is_unchanged(machine):
    """The folder every machine built before the GPU choice: the same key, no backend part."""
    assert tools.build_key() == CPU_KEY
    assert tools.build_dir() == machine.path / "cache" / "llama.cpp" / "0.3.36" / CPU_KEY
    assert tools.build_key(tools.gpu_backend("cpu")) == CPU_KEY


def test_this_machines_cpu_build_is_still_found():
    """No rebuild here: the CPU build `make setup` made before (the venv links to it) has the key that the CPU
    choice computes now, so ensure_built finds it finished in its folder."""
    manifest = tools._read_manifest(tools.venv_link())
    if manifest is None or tools.built_backend(manifest) != "cpu":
        pytest.skip("no CPU build of llama.cpp's tools linked from this venv")
    tools._decide.cache_clear()
    try:
        assert tools.build_key(tools.gpu_backend("cpu")) == manifest["key"] == tools.venv_link().resolve().name
    finally:
        tools._decide.cache_clear()


def test_cuda_and_cpu_builds_never_share_a_folder(machine, monkeypatch):
    nvcc = machine.toolkit()
    machine.driver()
    monkeypatch.setenv("PATH", f"{nvcc.parent}{os.pathsep}{machine.bin}")
    cuda, cpu = tools.gpu_backend("cuda"), tools.gpu_backend("cpu")
    assert tools.build_key(cuda) == CPU_KEY + "-cuda13.0-sm90"
    assert tools.build_dir(key=tools.build_key(cuda)) != tools.build_dir(key=tools.build_key(cpu))
    monkeypatch.setenv(tools.ARCHS_ENV, "86")
    assert tools.build_key(tools.gpu_backend("cuda")) == CPU_KEY + "-cuda13.0-sm86"


def test_macos_keys(machine, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert tools.gpu_backend().name == "metal" and tools.build_key() == CPU_KEY  # the Metal build's folder as before
    assert tools.build_key(tools.gpu_backend("cpu")) == CPU_KEY + "-cpu"
    with pytest.raises(LlamaRuntimeError, match="not for macOS"):
        tools.gpu_backend("cuda")


# ----------------------------------------------------------------------------- cmake's argv

def _argv(backend) -> list[str]:
    return build._cmake(Path("/b"), "sdist-0", backend)


def test_cpu_argv_is_todays(machine):
    argv = _argv(tools.gpu_backend("cpu"))
    assert argv == _argv(None)
    assert not any("CUDA" in a or "METAL" in a for a in argv)
    assert argv[argv.index("-DCMAKE_BUILD_TYPE=Release"):] == [*build.CMAKE_OPTIONS, "-DGGML_CCACHE=OFF",
                                                                "-DLLAMA_BUILD_NUMBER=0", "-DLLAMA_BUILD_COMMIT=sdist-0"]


def test_metal_and_macos_cpu_argv(machine, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert "-DGGML_METAL=ON" in _argv(tools.gpu_backend()) and _argv(tools.gpu_backend()) == _argv(None)
    assert "-DGGML_METAL=OFF" in _argv(tools.gpu_backend("cpu"))


def test_cuda_argv(machine, monkeypatch):
    nvcc = machine.toolkit()
    machine.driver()
    monkeypatch.setenv("PATH", f"{nvcc.parent}{os.pathsep}{machine.bin}")
    monkeypatch.setenv(tools.ARCHS_ENV, "90")
    argv = _argv(tools.gpu_backend())
    driver = machine.path / "nvidia" / "lib" / "libcuda.so.1"
    for opt in ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DGGML_CUDA_NCCL=OFF",
                f"-DCMAKE_CUDA_COMPILER={nvcc.resolve()}",
                # a toolkit without its libcuda.so stub: the driver's own library, linked by path
                f"-DCUDA_cuda_driver_LIBRARY={driver}",
                # the runtime's folder, and the driver's (the loader's cache does not list it here)
                f"-DCMAKE_BUILD_RPATH={nvcc.parents[1] / 'lib64'};{driver.parent}"):
        assert opt in argv
    assert "-DGGML_CUDA_NO_VMM=ON" not in argv and "-DGGML_METAL=ON" not in argv
    assert argv[:argv.index("-DGGML_CUDA=ON")][-len(build.CMAKE_OPTIONS):] == list(build.CMAKE_OPTIONS)


def test_cuda_argv_links_the_toolkits_stub_or_nothing(machine, monkeypatch):
    nvcc = machine.toolkit(stub=True)
    monkeypatch.setenv("PATH", f"{nvcc.parent}{os.pathsep}{machine.bin}")
    monkeypatch.setenv(tools.ARCHS_ENV, "90")
    argv = _argv(tools.gpu_backend("cuda"))
    assert f"-DCUDA_cuda_driver_LIBRARY={nvcc.parents[1] / 'lib64' / 'stubs' / 'libcuda.so'}" in argv
    (nvcc.parents[1] / "lib64" / "stubs" / "libcuda.so").unlink()
    tools._decide.cache_clear()
    argv = _argv(tools.gpu_backend("cuda"))
    assert "-DGGML_CUDA_NO_VMM=ON" in argv and not any(a.startswith("-DCUDA_cuda_driver_LIBRARY") for a in argv)
    assert f"-DCMAKE_BUILD_RPATH={nvcc.parents[1] / 'lib64'}" in argv


# ----------------------------------------------------------------------------- failures and the manifest

def _cmake_fails(monkeypatch, machine) -> list:
    """A cmake on PATH that fails as a CUDA configure does (run through tools.proc.run for real)."""
    calls = machine.path / "cmake-calls"
    _exe(machine.bin / "cmake", f'echo "$@" >> {calls}; echo "CMake Error: CUDA::cuda_driver not found"; exit 1')

    def read() -> list:
        return [l.split() for l in calls.read_text().splitlines()] if calls.exists() else []
    return read


def test_cuda_failure_is_one_line_and_leaves_the_cpu_build(machine, monkeypatch):
    """A CUDA configure that fails names what to do, and neither the CPU build nor the venv's link moves."""
    nvcc = machine.toolkit()
    machine.driver()
    monkeypatch.setenv("PATH", f"{nvcc.parent}{os.pathsep}{machine.bin}")
    monkeypatch.setenv(tools.ARCHS_ENV, "90")
    cpu_dir = tools.build_dir(key=tools.build_key(tools.gpu_backend("cpu")))
    (cpu_dir / "bin").mkdir(parents=True)
    manifest = {"llama_cpp_python": "0.3.36", "key": cpu_dir.name}
    (cpu_dir / tools.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(build, "fetch_source", lambda folder, v, log, p=None: {"sdist": "s", "sdist_sha256": "0" * 64})
    cmake_calls = _cmake_fails(monkeypatch, machine)
    linked = []
    monkeypatch.setattr(build, "link_venv", lambda folder: linked.append(folder))
    with pytest.raises(LlamaRuntimeError) as exc:
        build.ensure_built(jobs=1)
    line = exc.value.one_line()
    assert "\n" not in line and "CUDA build" in line and f"{tools.GPU_ENV}=cpu" in line and "toolkit" in line
    assert "cmake configure" in line and "CMake Error" in line
    calls = cmake_calls()
    assert len(calls) == 1 and "-DGGML_CUDA=ON" in calls[0]
    assert calls[0][calls[0].index("-S") + 1].endswith("-cuda13.0-sm90/src")
    assert json.loads((cpu_dir / tools.MANIFEST).read_text()) == manifest and linked == []


def test_cuda_without_archs_fails_before_cmake(machine, monkeypatch):
    nvcc = machine.toolkit()
    machine.driver(smi=False)
    monkeypatch.setenv("PATH", f"{nvcc.parent}{os.pathsep}{machine.bin}")
    calls = _cmake_fails(monkeypatch, machine)
    with pytest.raises(LlamaRuntimeError, match=tools.ARCHS_ENV):
        build.compile_tools(machine.path, "c", 1, machine.path / "log", backend=tools.gpu_backend())
    assert calls() == []


def test_a_failing_cpu_build_step_is_one_line_too(machine, monkeypatch):
    """tools.proc.run raises its error_cls with the command: the build's error class takes it (no TypeError)."""
    _cmake_fails(monkeypatch, machine)
    with pytest.raises(LlamaRuntimeError) as exc:
        build.compile_tools(machine.path, "c", 1, machine.path / "log", backend=tools.gpu_backend("cpu"))
    assert "cmake configure failed with exit code 1" in exc.value.one_line() and "CUDA build" not in str(exc.value)
    assert exc.value.command[0] == "cmake"


def test_manifest_backend_and_labels():
    assert tools.built_backend({"cmake_options": list(build.CMAKE_OPTIONS)}) == "cpu"   # a build from before
    assert tools.built_backend({"cmake_options": [*build.CMAKE_OPTIONS, *build.DARWIN_OPTIONS]}) == "metal"
    assert tools.backend_label({"backend": "cuda", "cuda_sms": ["90"]}) == "CUDA (sm_90)"
    assert tools.backend_label({"cmake_options": ["-DGGML_CUDA=ON"]}) == "CUDA (unknown archs)"
    assert tools.backend_label({}) == "CPU" and tools.backend_label({"backend": "metal"}) == "Metal"
    b = tools.Backend("cuda", "test", "-cuda13.0-sm90", "/cuda/bin/nvcc", "13.0", "native", ("90",))
    m = build.backend_manifest(b)
    assert (m["backend"], m["backend_label"], m["cuda_archs"], m["cuda_sms"]) == ("cuda", "CUDA (sm_90)", "native", ["90"])
    assert build.backend_manifest(tools.Backend("cpu", "x")) == {"backend": "cpu", "backend_label": "CPU",
                                                                 "backend_why": "x"}


# ----------------------------------------------------------------------------- health: n_gpu_layers on a CPU build

@pytest.mark.parametrize("layers, manifest, status", [
    (-1, {"cmake_options": list(build.CMAKE_OPTIONS)}, "warn"),
    (12, {"backend": "cpu"}, "warn"),
    (-1, {"backend": "cuda", "cuda_sms": ["90"]}, "pass"),
    (0, {"backend": "cpu"}, None),
])
def test_health_warns_when_gpu_layers_meet_a_cpu_build(tmp_path, monkeypatch, layers, manifest, status):
    from loradeploy.config import config_from_dict
    from loradeploy.health.system import offload_checks

    monkeypatch.setattr(tools, "locate", lambda: (tmp_path, manifest))
    cfg = config_from_dict({"deployment": {"llamacpp": {"n_gpu_layers": layers}},
                            "models": {"m": {"base_model": str(tmp_path), "adapter": str(tmp_path), "port": 5000}}},
                           base_dir=tmp_path)
    checks = offload_checks(cfg)
    if status is None:
        assert checks == []
        return
    (c,) = checks
    assert (c.name, c.status) == ("system.gpu_offload", status)
    if status == "warn":
        assert "runs on the CPU" in c.detail or "run on the CPU" in c.detail
        assert f"{tools.GPU_ENV}=cuda make setup" in c.remedy and "n_gpu_layers: 0" in c.remedy
    else:
        assert "CUDA (sm_90)" in c.detail
