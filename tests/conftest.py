import pytest

# Fixtures shared across test files.
pytest_plugins = ["tests.fixtures.models", "tests.fixtures.receivers", "tests.fixtures.sshd"]


@pytest.fixture(scope="session", autouse=True)
def _isolate_session_home(tmp_path_factory):
    """Session- and module-scoped fixtures (built models, sshd, receivers) run before any test's own
    HOME exists: they get a throwaway HOME too, never the user's (caches, ~/.lmstudio, known_hosts)."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("session-home")
    mp.setenv("HOME", str(home))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    # One llama.cpp CPU-mode verdict for the whole session (servers the tests start inherit it), decided
    # the way production decides it: by the probe. In-process loads in tests then use that mode.
    mp.setenv("LORADEPLOY_CACHE_DIR", str(home / ".cache" / "loradeploy"))
    mp.delenv("LORADEPLOY_LLAMA_CPU_MODE", raising=False)
    from loradeploy.llamacpp import runtime

    runtime.ensure_in_process()
    yield home
    mp.undo()


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
