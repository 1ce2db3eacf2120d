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
    """This workplace's VMs advertise AMX and trap it (SIGILL): in-process llama_cpp.Llama in tests
    loads without llama.cpp's extra weight buffers."""
    try:
        from loradeploy.tools.llama_safe import disable_extra_bufts
        disable_extra_bufts()
    except ImportError:
        pass


_no_extra_bufts()
