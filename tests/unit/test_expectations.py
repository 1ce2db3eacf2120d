"""Health and evaluate limits left at auto scale with the served file's size and the cores."""
from __future__ import annotations

import pytest

from loradeploy.config import EvaluationConfig, HealthCheckConfig
from loradeploy.expectations import eval_timeout, health_limits, model_bytes, tokens_per_s
from loradeploy.resources import cpu_budget

Q4_7B = int(4.36e9)     # Qwen2.5-7B Q4_K_M
TOY = 4 * 2**20


def test_a_toy_model_keeps_the_fixed_limits():
    hc = health_limits(HealthCheckConfig(), TOY, 2)
    assert (hc.min_tokens_per_s, hc.max_latency_s, hc.timeout_s) == (1.0, 10.0, 30.0)
    assert eval_timeout(EvaluationConfig(), TOY, 2) == 60.0


def test_a_7b_on_two_cores_gets_limits_it_can_meet():
    rate = tokens_per_s(Q4_7B, 2)
    assert 0.5 < rate < 1.5
    hc = health_limits(HealthCheckConfig(), Q4_7B, 2)
    # the 0.3 tokens/s a busy 2-core machine measured is not degraded; 0.1 is
    assert 0.1 < hc.min_tokens_per_s < 0.3
    # a 64-token answer at the expected rate fits 3 times over, and the deadline is above the limit
    assert hc.max_latency_s >= 3 * 64 / rate - 1 and hc.timeout_s >= hc.max_latency_s
    # more cores: tighter limits
    assert health_limits(HealthCheckConfig(), Q4_7B, 16).min_tokens_per_s > hc.min_tokens_per_s
    t = eval_timeout(EvaluationConfig(), Q4_7B, 2)
    assert t > 60 and t >= 64 / rate * 2  # two requests share the cores


def test_written_limits_win():
    hc = health_limits(HealthCheckConfig(timeout_s=5, max_latency_s=2, min_tokens_per_s=7), Q4_7B, 2)
    assert (hc.timeout_s, hc.max_latency_s, hc.min_tokens_per_s) == (5, 2, 7)
    assert eval_timeout(EvaluationConfig(timeout_s=9), Q4_7B, 2) == 9


def test_model_bytes_and_cores(tmp_path, monkeypatch):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"x" * 100)
    b.write_bytes(b"x" * 23)
    assert model_bytes(a, None, b, tmp_path / "missing") == 123
    # the limits scale by the cores resources.cpu_budget gives a server
    assert cpu_budget(1) == 1 and cpu_budget() >= 1
    # macOS has no sched_getaffinity: the CPU count stands in
    import loradeploy.resources as res
    monkeypatch.delattr(res.os, "sched_getaffinity")
    assert cpu_budget() == (res.os.cpu_count() or 1)


@pytest.mark.parametrize("cfg", [HealthCheckConfig, EvaluationConfig])
def test_auto_is_the_default(cfg):
    assert cfg().timeout_s is None
