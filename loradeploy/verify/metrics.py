"""Token-distribution statistics with llama.cpp's definitions (tools/perplexity, ``--kl-divergence``).

Per scored position t (the model has read tokens 0..t and predicts t+1):

- KLD = sum_v p_ref(v) * (log p_ref(v) - log p_cand(v)), over the whole vocabulary;
- same top p: argmax p_ref == argmax p_cand;
- Δp = p_cand(x) - p_ref(x) for the token x that actually comes next.

Summaries: mean KLD (with its standard error), median, 99th and 99.9th percentile and maximum,
top-1 agreement, RMS Δp and mean Δp. Everything is computed in float64 over row chunks, so a
152k vocabulary costs a few tens of MB at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ROWS_PER_CHUNK = 16   # 16 x 152k float64 = 19 MB per intermediate (a few live at once)
LOGSOFTMAX_ROWS = 32   # rows of the reference's logits turned to float64 log-probabilities at once


@dataclass
class PositionStats:
    """Per-position arrays for one candidate, appended sequence by sequence."""

    kld: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)
    dp: list[np.ndarray] = field(default_factory=list)

    def add(self, ref_logprobs: np.ndarray, cand_logits: np.ndarray, next_ids: np.ndarray) -> None:
        """``ref_logprobs``: (n, V) log-probabilities; ``cand_logits``: (n, V) raw logits."""
        if ref_logprobs.shape != cand_logits.shape:
            raise ValueError(f"logit shapes differ: reference {ref_logprobs.shape}, candidate {cand_logits.shape}")
        for lo in range(0, ref_logprobs.shape[0], ROWS_PER_CHUNK):
            hi = min(lo + ROWS_PER_CHUNK, ref_logprobs.shape[0])
            rows = np.arange(hi - lo)
            ref = np.asarray(ref_logprobs[lo:hi], dtype=np.float64)
            x = np.asarray(cand_logits[lo:hi], dtype=np.float64)
            p = np.exp(ref)
            top = x.argmax(axis=1)
            lse = x[rows, top] + np.log(np.exp(x - x[rows, top][:, None]).sum(axis=1))
            # sum_v p (ref - (x - lse)), expanded so no (rows x vocab) temporary is built for it; sum p is
            # kept rather than taken as 1 (float32 storage leaves it 1 +- 1e-7, which times lse ~ 10
            # would swamp the 1e-6 KLDs of a 16-bit file)
            self.kld.append(np.einsum("ij,ij->i", p, ref) - np.einsum("ij,ij->i", p, x) + lse * p.sum(axis=1))
            self.same_top.append(ref.argmax(axis=1) == top)
            nxt = np.asarray(next_ids[lo:hi])
            self.dp.append(np.exp(x[rows, nxt] - lse) - p[rows, nxt])

    @property
    def n(self) -> int:
        return int(sum(len(a) for a in self.kld))

    def summary(self) -> dict:
        return summarize(np.concatenate(self.kld) if self.kld else np.zeros(0),
                         np.concatenate(self.same_top) if self.same_top else np.zeros(0, bool),
                         np.concatenate(self.dp) if self.dp else np.zeros(0))


def summarize(kld: np.ndarray, same_top: np.ndarray, dp: np.ndarray) -> dict:
    n = int(kld.size)
    if n == 0:
        return {"n_positions": 0}
    top1 = float(same_top.mean())
    return {
        "n_positions": n,
        "kld_mean": float(kld.mean()),
        "kld_mean_err": float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "kld_median": float(np.percentile(kld, 50)),
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_p999": float(np.percentile(kld, 99.9)),
        "kld_max": float(kld.max()),
        "top1": top1,
        "top1_err": float(math.sqrt(top1 * (1 - top1) / (n - 1))) if n > 1 else None,
        "rms_dp": float(math.sqrt(float((dp ** 2).mean()))),
        "mean_dp": float(dp.mean()),
    }


def noise_to_signal(kld_mean: float | None, signal: float | None) -> float | None:
    """KLD(candidate) / KLD(reference || base); None when the adapter changes nothing measurable."""
    if kld_mean is None or not signal or signal <= 0:
        return None
    return float(kld_mean / signal)
