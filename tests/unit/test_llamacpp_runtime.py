"""The llama.cpp CPU-mode decision: real probe children, every kind of death, the cache, the override.

The probe child's test-only switch (LORADEPLOY_PROBE_SELFTEST) makes it kill itself with a given
signal, hang or fail in a given mode, so the parent's handling is proven on any machine.
"""
from __future__ import annotations

import json

import pytest

from loradeploy.errors import LlamaRuntimeError
from loradeploy.llamacpp import runtime
from loradeploy.llamacpp.probe import SELFTEST_ENV


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv(runtime.MODE_ENV, raising=False)
    monkeypatch.delenv(SELFTEST_ENV, raising=False)
    d = tmp_path / "cache"
    monkeypatch.setenv(runtime.CACHE_ENV, str(d))
    return d


@pytest.mark.parametrize("sig", ["SIGILL", "SIGSEGV", "SIGBUS"])
def test_default_mode_dying_of_any_signal_falls_back_to_safe(cache, monkeypatch, sig):
    monkeypatch.setenv(SELFTEST_ENV, f"default:{sig}")
    mode = runtime.decide(directory=cache, refresh=True)
    assert mode.name == "safe" and mode.source == "probe" and not mode.extra_bufts
    default, safe = mode.attempts
    assert not default.ok and default.how == f"killed by {sig}"
    assert safe.ok and safe.how.startswith("generated")
    assert f"default mode killed by {sig}" in mode.why and "safe mode generated" in mode.why


def test_a_probe_that_hangs_is_killed_at_its_deadline(cache, monkeypatch):
    monkeypatch.setenv(SELFTEST_ENV, "default:hang")
    mode = runtime.decide(directory=cache, refresh=True, timeout=15)
    default = mode.attempts[0]
    assert mode.name == "safe" and default.how == "hung past 15 s" and default.seconds < 30


def test_a_probe_that_fails_with_an_exit_code_counts_as_failed(cache, monkeypatch):
    monkeypatch.setenv(SELFTEST_ENV, "default:fail")
    mode = runtime.decide(directory=cache, refresh=True)
    assert mode.name == "safe"
    assert mode.attempts[0].how.startswith("exited with code 1: selftest: failing on purpose")


def test_both_modes_failing_is_one_line_naming_the_cpu_and_what_was_tried(cache, monkeypatch):
    monkeypatch.setenv(SELFTEST_ENV, "default:SIGSEGV,safe:SIGABRT")
    with pytest.raises(LlamaRuntimeError) as err:
        runtime.decide(directory=cache, refresh=True)
    line = err.value.one_line()
    assert "\n" not in line and runtime.fingerprint()["cpu"] in line
    assert "default mode killed by SIGSEGV" in line and "safe mode killed by SIGABRT" in line
    assert err.value.exit_code == 3
    assert not list(cache.glob("llamacpp-cpu-mode-*.json")), "a failed decision is not cached"


def test_verdict_is_cached_per_machine_and_paid_once(cache, monkeypatch):
    monkeypatch.setenv(SELFTEST_ENV, "default:SIGSEGV")
    first = runtime.decide(directory=cache, refresh=True)
    [cached] = cache.glob("llamacpp-cpu-mode-*.json")
    data = json.loads(cached.read_text())
    assert data["mode"] == "safe" and data["fingerprint"] == runtime.fingerprint()
    runtime._DECIDED.clear()

    def no_probe(*a, **kw):
        raise AssertionError("probed again although a verdict for this machine is cached")

    monkeypatch.setattr(runtime, "probe_mode", no_probe)
    again = runtime.decide(directory=cache)
    assert (again.name, again.source, again.why) == ("safe", "cache", first.why)
    assert again.describe().startswith("safe (cached verdict of ") and "killed by SIGSEGV" in again.describe()


def test_another_machine_or_llama_cpp_version_is_probed_anew(cache, monkeypatch):
    monkeypatch.setenv(SELFTEST_ENV, "default:SIGSEGV")
    runtime.decide(directory=cache, refresh=True)
    runtime._DECIDED.clear()
    real = runtime.fingerprint()
    monkeypatch.setattr(runtime, "fingerprint", lambda: {**real, "llama_cpp_python": "9.9.9"})
    monkeypatch.setenv(SELFTEST_ENV, "default:SIGBUS")
    mode = runtime.decide(directory=cache)
    assert mode.source == "probe" and mode.attempts[0].how == "killed by SIGBUS"
    assert len(list(cache.glob("llamacpp-cpu-mode-*.json"))) == 2


def test_a_damaged_cached_verdict_is_probed_again(cache, monkeypatch):
    monkeypatch.setenv(SELFTEST_ENV, "default:SIGILL")
    runtime.decide(directory=cache, refresh=True)
    runtime._DECIDED.clear()
    [cached] = cache.glob("llamacpp-cpu-mode-*.json")
    cached.write_text('{"mode": "defau')
    mode = runtime.decide(directory=cache)
    assert mode.source == "probe" and json.loads(cached.read_text())["mode"] == "safe"


def test_the_environment_overrides_the_probe(cache, monkeypatch):
    monkeypatch.setenv(runtime.MODE_ENV, "safe")
    mode = runtime.decide(directory=cache)
    assert (mode.name, mode.source) == ("safe", "env") and mode.describe() == f"safe (set by {runtime.MODE_ENV})"
    monkeypatch.setenv(runtime.MODE_ENV, "fast")
    with pytest.raises(LlamaRuntimeError, match="is not a mode"):
        runtime.decide(directory=cache)


def test_this_machine_gets_a_mode_that_really_generates(cache):
    """No selftest: whatever this CPU is, the verdict's mode loads a K-quant model in-process and generates."""
    mode = runtime.decide(directory=cache, refresh=True)
    assert mode.attempts[-1].ok and mode.attempts[-1].mode == mode.name
    if mode.name == "safe":
        assert not mode.attempts[0].ok, "safe mode is chosen only when the default mode failed"
    runtime.apply_mode(mode.extra_bufts)
    import llama_cpp

    model = cache / f"probe-model-v{runtime.PROBE_VERSION}.gguf"
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=64, n_threads=1, verbose=False)
    tokens = [t for _, t in zip(range(3), llm.generate([1, 5, 9, 12, 40], temp=0.0))]
    assert len(tokens) == 3
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts == mode.extra_bufts


def test_probe_model_has_k_quant_and_q8_0_tensors(cache):
    runtime.decide(directory=cache, refresh=True)
    from gguf import GGUFReader

    types = {t.tensor_type.name for t in GGUFReader(str(cache / f"probe-model-v{runtime.PROBE_VERSION}.gguf")).tensors}
    assert {"Q4_K", "Q8_0"} <= types, types


def test_demote_makes_the_cached_verdict_safe(cache, monkeypatch):
    monkeypatch.setattr(runtime, "cache_dir", lambda: cache)
    monkeypatch.setenv(SELFTEST_ENV, "")
    runtime.decide(refresh=True)
    mode = runtime.demote("a server of x.gguf was killed by SIGSEGV")
    assert mode.name == "safe"
    runtime._DECIDED.clear()
    again = runtime.decide()
    assert (again.name, again.source, again.why) == ("safe", "cache", "a server of x.gguf was killed by SIGSEGV")
