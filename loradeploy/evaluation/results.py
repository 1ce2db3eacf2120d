"""Result types of one evaluation run, per-target aggregates and the side-by-side comparison."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from . import metrics
from .chat import ReplyStats
from .samples import Sample
from .targets import EvalTarget


@dataclass
class SampleResult(ReplyStats):
    """One answer to one sample: the reply's text and measurements (keywords), then its scores."""

    target: str
    sample_id: str
    repeat: int
    response: str = ""
    scores: dict = field(default_factory=dict)
    quality: Optional[float] = None
    tags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        head = {k: d.pop(k) for k in ("target", "sample_id", "repeat", "response")}   # who first, then how
        return {**head, **d, "tags": list(self.tags)}


@dataclass
class TargetResult:
    target: EvalTarget
    status: str = "ok"                      # ok | partial | failed | down
    error: Optional[str] = None             # why a whole target failed (down, did not start)
    n_samples: int = 0
    aggregates: dict = field(default_factory=dict)
    seconds: float = 0.0
    # which llama.cpp CPU mode served it and why: {"mode", "source", "why"}; None when not known,
    # so a report never states a mode nobody decided
    runtime: Optional[dict] = None

    def to_dict(self) -> dict:
        d = {"target": self.target.to_dict(), "status": self.status, "error": self.error,
             "n_samples": self.n_samples, "seconds": round(self.seconds, 3), "aggregates": self.aggregates}
        if self.runtime is not None:
            d["runtime"] = self.runtime
        return d


@dataclass
class EvalResult:
    schema_version: int
    created_at: float
    seconds: float
    config: dict
    samples_path: Optional[str]
    samples: list[Sample]
    targets: list[TargetResult]
    results: list[SampleResult]
    comparison: list[dict]
    notes: list[str] = field(default_factory=list)
    reports: dict = field(default_factory=dict)
    runtime: Optional[dict] = None          # the run's llama.cpp CPU mode, when one applies to all of it

    @property
    def errors(self) -> int:
        return sum(1 for r in self.results if r.error)

    @property
    def ok(self) -> bool:
        """Something was measured (at least one target answered)."""
        return any(t.status in ("ok", "partial") for t in self.targets)

    def failures(self) -> list[str]:
        """Every target that is down or failed requests, with why: the run is then not ok."""
        out = []
        for t in self.targets:
            if t.status in ("down", "failed"):
                out.append(f"{t.target.label} {t.status}" + (f" ({t.error})" if t.error else ""))
            elif t.status == "partial":
                out.append(f"{t.target.label} partial ({t.aggregates.get('errors', 0)} of "
                           f"{t.aggregates.get('requests', 0)} requests failed)")
        return out

    def target(self, label: str) -> TargetResult:
        for t in self.targets:
            if t.target.label == label:
                return t
        raise KeyError(label)

    def results_for(self, label: str) -> list[SampleResult]:
        return [r for r in self.results if r.target == label]

    def to_dict(self) -> dict:
        return {"schema_version": self.schema_version, "created_at": self.created_at,
                "ok": not self.failures(), "failures": self.failures(),
                "seconds": round(self.seconds, 3), "config": self.config, "samples_path": self.samples_path,
                "n_samples": len(self.samples), "notes": self.notes, "reports": self.reports,
                "targets": [t.to_dict() for t in self.targets], "comparison": self.comparison,
                "samples": [s.to_dict() for s in self.samples],
                "results": [r.to_dict() for r in self.results],
                **({"runtime": self.runtime} if self.runtime is not None else {})}


def round_opt(v: Optional[float], nd: int = 4) -> Optional[float]:
    return None if v is None else round(float(v), nd)


def _rounded(d: dict, nd: int = 4) -> dict:
    return {k: round_opt(v, nd) if isinstance(v, float) else v for k, v in d.items()}


def _quality_means(rows: list[SampleResult]) -> dict:
    out = {k: round_opt(metrics.mean(r.scores.get(k) for r in rows if not r.error)) for k in metrics.QUALITY_METRICS}
    out["quality"] = round_opt(metrics.mean(r.quality for r in rows if not r.error))
    return out


def _gen_tps(ok: list[SampleResult]) -> tuple[Optional[float], Optional[str]]:
    """Decode speed: the server's timings when reported, else the stream's token arrival times.

    When a stream's tokens arrive in bursts (a tiny model finishes before the first chunk is
    flushed) the arrival window says nothing; then the end-to-end rate is the honest number.
    """
    server = [r.gen_tps for r in ok if r.tps_source == "server"]
    if server:
        return metrics.mean(server), "server"
    toks = sum((r.completion_tokens or 0) - 1 for r in ok if r.decode_s and (r.completion_tokens or 0) > 1)
    window = sum(r.decode_s for r in ok if r.decode_s and (r.completion_tokens or 0) > 1)
    latency = sum(r.latency_s or 0 for r in ok)
    if toks and window > 0.05 * latency:
        return toks / window, "stream"
    n = sum(r.completion_tokens or 0 for r in ok)
    return (n / latency, "end-to-end") if n and latency else (None, None)


def aggregate(rows: list[SampleResult]) -> dict:
    """Latency, TTFT, throughput and quality over one target's rows (errors count as errors only)."""
    ok = [r for r in rows if not r.error]
    gen_tps, tps_source = _gen_tps(ok)
    total_lat = sum(r.latency_s or 0 for r in ok)
    tags: dict[str, list[SampleResult]] = {}
    for r in rows:
        for t in r.tags:
            tags.setdefault(t, []).append(r)
    return {
        "requests": len(rows), "ok": len(ok), "errors": len(rows) - len(ok),
        "latency_s": _rounded(metrics.summarize([r.latency_s for r in ok])),
        "ttft_s": _rounded(metrics.summarize([r.ttft_s for r in ok])),
        "gen_tokens_per_s": round_opt(gen_tps, 2), "gen_tokens_per_s_source": tps_source,
        "e2e_tokens_per_s": round_opt(sum(r.completion_tokens or 0 for r in ok) / total_lat if total_lat else None, 2),
        "prompt_tokens_per_s": round_opt(metrics.mean(r.prompt_tps for r in ok), 2),
        "completion_tokens_mean": round_opt(metrics.mean(r.completion_tokens for r in ok), 2),
        "quality": _quality_means(rows),
        "tags": {t: {"requests": len(rs), "errors": sum(1 for r in rs if r.error), **_quality_means(rs)}
                 for t, rs in sorted(tags.items())},
    }


def compare(targets: list[TargetResult]) -> list[dict]:
    """Side-by-side rows; each format's quality delta to the best format of its model and to its base."""
    rows = []
    by_model: dict[str, list[TargetResult]] = {}
    for t in targets:
        by_model.setdefault(t.target.model, []).append(t)
    for model, ts in by_model.items():
        scored = [t for t in ts if not t.target.is_base and t.aggregates.get("quality", {}).get("quality") is not None]
        # ties go to the smaller file: same quality for less memory
        best = max(scored, key=lambda t: (t.aggregates["quality"]["quality"],
                                          -(t.aggregates.get("memory", {}).get("file_mib") or 0)), default=None)
        base = next((t for t in ts if t.target.is_base), None)
        base_q = base.aggregates.get("quality", {}).get("quality") if base else None
        for t in ts:
            a, q = t.aggregates, t.aggregates.get("quality", {})
            mem = a.get("memory", {})
            row = {
                "label": t.target.label, "model": model, "format": t.target.format, "is_base": t.target.is_base,
                "live": t.target.live, "status": t.status, "reason": t.error, "errors": a.get("errors", 0),
                "requests": a.get("requests", 0),
                "quality": q.get("quality"), "exact": q.get("exact"), "contains": q.get("contains"),
                "rouge_l": q.get("rouge_l"), "chrf": q.get("chrf"),
                "latency_p50_s": a.get("latency_s", {}).get("p50"), "latency_p95_s": a.get("latency_s", {}).get("p95"),
                "ttft_p50_s": a.get("ttft_s", {}).get("p50"), "gen_tokens_per_s": a.get("gen_tokens_per_s"),
                "prompt_tokens_per_s": a.get("prompt_tokens_per_s"),
                "file_mib": mem.get("file_mib"), "rss_mib": mem.get("rss_mib"), "anon_mib": mem.get("anon_mib"),
                "file_pages_mib": mem.get("file_pages_mib"), "gpu_mib": mem.get("gpu_mib"),
                "best_format": best.target.format if best else None,
                "delta_vs_best": None, "delta_vs_base": None,
            }
            if q.get("quality") is not None:
                if best is not None and not t.target.is_base:
                    row["delta_vs_best"] = round_opt(q["quality"] - best.aggregates["quality"]["quality"])
                if base_q is not None and not t.target.is_base:
                    row["delta_vs_base"] = round_opt(q["quality"] - base_q)
            rows.append(row)
    return rows
