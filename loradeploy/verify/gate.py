"""The gate: per-format limits, each candidate's pass/fail, and what the deploy should serve.

Default mean-KLD limits follow llama.cpp's published Llama-3-8B measurements (tools/perplexity
README, no imatrix) with a margin of roughly 1.2-1.4x, so a fine-tune quantized as well as a stock
model passes and one that lost more than that does not. Types the table has no row for get the
limit of the nearest type with at least as many bits per weight. 16-bit and 32-bit files are held
tight: they differ from the fp32 reference only by rounding.

A failed chat-template or stop check blocks whatever ``on_fail`` says: a model that renders the
wrong prompt or never ends its turn is broken, not degraded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ..config.verify import VerifyConfig

# format: (max mean KLD, min top-1 agreement, approximate bits per weight)
DEFAULTS: dict[str, tuple[float, float, float]] = {
    "F32": (0.0001, 0.995, 32), "F16": (0.0005, 0.99, 16), "BF16": (0.002, 0.985, 16),
    "Q8_0": (0.0014, 0.97, 8.5), "Q6_K": (0.0055, 0.94, 6.6),
    "Q5_K_M": (0.011, 0.92, 5.7), "Q5_K_S": (0.014, 0.915, 5.5), "Q5_1": (0.014, 0.91, 6.0),
    "Q5_0": (0.02, 0.90, 5.5),
    "Q4_K_M": (0.031, 0.88, 4.9), "Q4_K_S": (0.045, 0.87, 4.6), "IQ4_NL": (0.035, 0.87, 4.5),
    "IQ4_XS": (0.038, 0.87, 4.3), "Q4_1": (0.06, 0.86, 5.0), "Q4_0": (0.08, 0.85, 4.5),
    "Q3_K_L": (0.07, 0.84, 4.3), "Q3_K_M": (0.10, 0.82, 3.9), "IQ3_M": (0.10, 0.82, 3.7),
    "IQ3_S": (0.12, 0.80, 3.4), "Q3_K_S": (0.20, 0.77, 3.4), "IQ3_XS": (0.15, 0.79, 3.3),
    "IQ3_XXS": (0.20, 0.77, 3.1), "Q2_K": (0.45, 0.68, 3.0), "Q2_K_S": (0.50, 0.66, 2.8),
    "IQ2_M": (0.40, 0.68, 2.7), "IQ2_S": (0.55, 0.64, 2.5), "IQ2_XS": (0.65, 0.62, 2.3),
    "IQ2_XXS": (0.80, 0.58, 2.1), "IQ1_M": (1.3, 0.50, 1.8), "IQ1_S": (1.6, 0.45, 1.6),
    "TQ2_0": (1.0, 0.50, 2.1), "TQ1_0": (1.2, 0.48, 1.7),
}


def defaults_for(fmt: str) -> tuple[float, float]:
    fmt = fmt.upper()
    if fmt in DEFAULTS:
        return DEFAULTS[fmt][:2]
    # an unknown or new type: the row of the smallest known type that has no fewer bits
    bits = {"MXFP4_MOE": 4.3}.get(fmt, 4.0)
    row = min((r for r in DEFAULTS.values() if r[2] >= bits), key=lambda r: r[2])
    return row[:2]


@dataclass(frozen=True)
class Limits:
    max_kld: float
    min_top1: float
    max_noise_to_signal: Optional[float]   # None: not applied (the base yardstick)

    def to_dict(self) -> dict:
        return {"max_kld": self.max_kld, "min_top1": self.min_top1, "max_noise_to_signal": self.max_noise_to_signal}


def sized_after(fmt: str) -> str:
    """The stock format a tuned one (TUNED-Q4_K_M) is sized after, and so held to; any other format itself."""
    from ..config.tuned import is_tuned, parse_tuned

    if is_tuned(fmt):
        t = parse_tuned(fmt)
        return str(t.value) if t.kind == "format" else fmt.upper()
    return fmt.upper()


def limits_for(fmt: str, vcfg: "VerifyConfig") -> Limits:
    """The limits written for ``fmt``, else those of the format it is sized after (a tuned one), else the defaults."""
    fmt, base = fmt.upper(), sized_after(fmt)
    kld, top1 = defaults_for(base)
    kld = vcfg.max_kld.get(fmt, vcfg.max_kld.get(base, kld))
    if isinstance(vcfg.min_top1, dict):
        top1 = vcfg.min_top1.get(fmt, vcfg.min_top1.get(base, top1))
    elif vcfg.min_top1 is not None:
        top1 = float(vcfg.min_top1)
    return Limits(kld, top1, vcfg.max_noise_to_signal)


@dataclass(frozen=True)
class Failure:
    metric: str
    value: Optional[float]
    limit: Optional[float]
    why: str

    def line(self) -> str:
        return self.why


def _fmt(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.4g}"


def judge(entry: dict, limits: Limits, signal: Optional[float]) -> list[Failure]:
    """Every limit the candidate's entry breaks (empty: it passes)."""
    if entry.get("error"):
        return [Failure("error", None, None, entry["error"])]
    out: list[Failure] = []
    kld, top1, nts = entry.get("kld_mean"), entry.get("top1"), entry.get("noise_to_signal")
    if kld is None or not math.isfinite(kld) or kld > limits.max_kld:
        out.append(Failure("kld_mean", kld, limits.max_kld, f"kld_mean {_fmt(kld)} > {_fmt(limits.max_kld)}"))
    if top1 is None or top1 < limits.min_top1:
        out.append(Failure("top1", top1, limits.min_top1, f"top1 {_fmt(top1)} < {_fmt(limits.min_top1)}"))
    if limits.max_noise_to_signal is not None:
        if nts is None:
            out.append(Failure("noise_to_signal", None, limits.max_noise_to_signal,
                               f"noise_to_signal undefined: the adapter's signal is {_fmt(signal)} (it changes "
                               "nothing measurable)"))
        elif nts > limits.max_noise_to_signal:
            out.append(Failure("noise_to_signal", nts, limits.max_noise_to_signal,
                               f"noise_to_signal {_fmt(nts)} > {_fmt(limits.max_noise_to_signal)} (KLD "
                               f"{_fmt(kld)} against the adapter's signal {_fmt(signal)})"))
    for check in ("template", "stop"):
        v = entry.get(check)
        if v is not None and v.get("ok") is False:   # None: inconclusive, which does not fail
            first = (v.get("problems") or ["failed"])[0]
            out.append(Failure(check, None, None, f"{check} check failed: {first}"))
    return out


@dataclass
class Decision:
    verdict: str                        # passed | warned | fallback | blocked
    configured: str
    served: Optional[str]
    reason: str = ""
    passing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "configured": self.configured, "served": self.served,
                "reason": self.reason, "passing": self.passing}


def _behaviour_failed(failures: list[Failure]) -> bool:
    return any(f.metric in ("template", "stop") for f in failures)


def decide(entries: dict[str, dict], configured: str, on_fail: str, *, model: str = "", version: str = "") -> Decision:
    """What the deploy serves. ``entries``: label -> verify entry with ``passed``, ``failures`` and
    ``size``; ``configured`` is the label deployment.format asks for."""
    gated = {k: e for k, e in entries.items() if e.get("gated", True)}
    passing = sorted((k for k, e in gated.items() if e.get("passed")), key=lambda k: gated[k].get("size") or 0)
    who = " ".join(p for p in (model, version) if p)
    mine = gated.get(configured)
    if mine is None:
        return Decision("blocked", configured, None, f"verify has no result for {who} {configured}", passing)
    if mine.get("passed"):
        return Decision("passed", configured, configured, "", passing)
    fails = [Failure(**f) for f in mine.get("failures", [])]
    what = "; ".join(f.line() for f in fails) or "failed"
    # the smallest passing file: the user chose a size; the next one up that survives is the nearest
    alt = passing[0] if passing else None
    if _behaviour_failed(fails):
        return Decision("blocked", configured, None,
                        f"verify blocked the deploy of {who} {configured}: {what} (a chat-template or stop failure "
                        "always blocks; fix the tokenizer's chat template or eos token and re-run)", passing)
    if on_fail == "warn":
        return Decision("warned", configured, configured, f"{who} {configured} deployed despite: {what}", passing)
    if on_fail == "fallback" and alt is not None:
        return Decision("fallback", configured, alt, f"{who} {configured} failed ({what}); serving {alt}", passing)
    hint = (f"{alt} passes: set verify.on_fail: fallback or deployment.format: {alt}" if alt
            else "no verified format passes: retrain, or raise the limits in the verify section")
    return Decision("blocked", configured, None, f"verify blocked the deploy of {who} {configured}: {what}; {hint}",
                    passing)
