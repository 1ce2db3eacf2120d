import os

import pytest

# Fixtures shared across test files.
pytest_plugins = ["tests.fixtures.models", "tests.fixtures.receivers", "tests.fixtures.sshd"]


@pytest.fixture(autouse=True)
def _isolate_home(tmp_path, monkeypatch):
    """Every test gets its own HOME, so nothing reads or writes the user's real dot-folders."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    monkeypatch.delenv("LORADEPLOY_DEBUG", raising=False)
    yield


def _no_extra_bufts() -> None:
    """llama.cpp's extra weight buffers use AMX where the CPU advertises it; this workplace's VMs
    advertise AMX and trap it (SIGILL). In-process llama_cpp.Llama in tests loads without them."""
    try:
        import llama_cpp.llama_cpp as C
    except ImportError:
        return
    if getattr(C.llama_model_default_params, "_loradeploy_safe", False):
        return
    orig = C.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    params._loradeploy_safe = True
    C.llama_model_default_params = params


_no_extra_bufts()
