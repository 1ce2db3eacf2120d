"""What this machine can be expected to do with a model of a given size: the limits health and
evaluate scale from when the config leaves them at ``auto``, instead of numbers meant for a 4 MB toy.

Generating a token on a CPU reads every weight once, so tokens/s is about the memory bandwidth a
core can pull times the cores, over the file's bytes. 2 GB/s a core is a floor seen on busy shared
VMs (a Q4_K_M 7B, 4.4 GB, on 2 such cores: 0.3–0.9 tokens/s); a box with more bandwidth only
passes the limits more easily. Each limit is a multiple of the expected time, with the old fixed
default as its floor, so a toy model keeps the limits it always had.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from .config import EvaluationConfig, HealthCheckConfig

BYTES_PER_S_PER_CORE = 2.0e9
MIN_TOKENS_PER_S = 1.0      # floors: the fixed defaults these limits replace
MAX_LATENCY_S = 10.0
HEALTH_TIMEOUT_S = 30.0
EVAL_TIMEOUT_S = 60.0
SLOW_FRACTION = 0.2         # degraded below a fifth of the expected generation rate
LATENCY_MARGIN = 3.0        # one answer may take 3x its expected time (prompt, a busy neighbour)


def model_bytes(*paths: Union[str, Path, None]) -> int:
    """The bytes a server reads per token: the GGUF (plus a LoRA GGUF in adapter mode)."""
    total = 0
    for p in paths:
        try:
            total += Path(p).stat().st_size if p else 0
        except OSError:
            pass
    return total


def tokens_per_s(nbytes: int, n_cores: int) -> float:
    """Expected generation tokens/s of a model of ``nbytes`` on ``n_cores`` CPU cores."""
    return n_cores * BYTES_PER_S_PER_CORE / max(nbytes, 1)


def health_limits(hc: "HealthCheckConfig", nbytes: int, n_cores: int) -> "HealthCheckConfig":
    """``hc`` with every ``auto`` limit (None) set for this model on this machine."""
    rate = tokens_per_s(nbytes, n_cores)
    answer_s = hc.max_tokens / rate
    latency = hc.max_latency_s or max(MAX_LATENCY_S, LATENCY_MARGIN * answer_s)
    fill = {"min_tokens_per_s": hc.min_tokens_per_s if hc.min_tokens_per_s is not None
            else round(min(MIN_TOKENS_PER_S, SLOW_FRACTION * rate), 3),
            "max_latency_s": round(latency, 1),
            "timeout_s": hc.timeout_s or round(max(HEALTH_TIMEOUT_S, 2 * latency), 1)}
    return hc.model_copy(update=fill)


def eval_timeout(ev: "EvaluationConfig", nbytes: int, n_cores: int) -> float:
    """evaluation.timeout_s, or for ``auto`` the time one answer may take while ``concurrency``
    requests share the cores."""
    if ev.timeout_s:
        return ev.timeout_s
    answer_s = ev.max_tokens / tokens_per_s(nbytes, n_cores) * ev.concurrency
    return round(max(EVAL_TIMEOUT_S, 2 * LATENCY_MARGIN * answer_s), 1)

