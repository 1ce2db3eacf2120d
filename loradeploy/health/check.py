"""Running the checks: per endpoint (probe), for a whole deployment (check_health), and the
report they add up to, with the exit code the CLI returns for it."""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..expectations import health_limits, model_bytes
from ..resources import cpu_budget
from ..serving import endpoints as deployed
from ..verify.report import health_check as served_fidelity
from .api import client_for, model_checks, models_check, port_check
from .files import file_checks
from .results import EXIT_CODES, FAIL, SKIP, WARN, Check, EndpointLike, verdict
from .system import process_check, system_checks

if TYPE_CHECKING:
    from ..config import Config, HealthCheckConfig


@dataclass
class ModelHealth:
    model: str
    version: Optional[str] = None
    format: Optional[str] = None
    base_url: Optional[str] = None
    gguf_path: Optional[str] = None
    checks: list[Check] = field(default_factory=list)

    @property
    def status(self) -> str:
        return verdict(self.checks)

    @property
    def metrics(self) -> dict[str, Any]:
        """Headline numbers: worst case over the test prompts."""
        out: dict[str, Any] = {}
        for c in self.checks:
            if c.name == "model.performance":
                out.update({k: c.metrics[k] for k in ("latency_s", "ttft_s", "tokens_per_s",
                                                      "completion_tokens") if k in c.metrics})
            elif c.name == "api.models" and "response_s" in c.metrics:
                out["models_response_s"] = c.metrics["response_s"]
            elif c.name == "system.process":  # the model's memory: anonymous apart from file pages
                out.update({k: c.metrics[k] for k in ("rss_mib", "anon_mib", "file_pages_mib") if k in c.metrics})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "version": self.version, "format": self.format,
                "base_url": self.base_url, "gguf_path": self.gguf_path, "metrics": self.metrics,
                "checks": [c.to_dict() for c in self.checks]}


@dataclass
class HealthReport:
    models: dict[str, ModelHealth] = field(default_factory=dict)
    system: list[Check] = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def status(self) -> str:
        return verdict([*self.system, *(c for m in self.models.values() for c in m.checks)])

    @property
    def seconds(self) -> float:
        return round(self.finished_at - self.started_at, 3)

    def model_statuses(self) -> dict[str, str]:
        return {k: m.status for k, m in self.models.items()}

    def problems(self, model: str) -> dict[str, str]:
        """check name -> detail for the model's failed and warned checks (for notifications)."""
        m = self.models.get(model)
        return {c.name: c.detail for c in (m.checks if m else []) if c.status in (FAIL, WARN)}

    def failures(self) -> list[tuple[str, Check]]:
        return [(k, c) for k, m in self.models.items() for c in m.checks if c.status == FAIL] + \
               [("system", c) for c in self.system if c.status == FAIL]

    def warnings(self) -> list[tuple[str, Check]]:
        return [(k, c) for k, m in self.models.items() for c in m.checks if c.status == WARN] + \
               [("system", c) for c in self.system if c.status == WARN]

    def to_dict(self) -> dict[str, Any]:
        iso = lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")  # noqa: E731
        return {"status": self.status, "exit_code": exit_code(self), "started_at": iso(self.started_at),
                "finished_at": iso(self.finished_at), "seconds": self.seconds,
                "models": {k: m.to_dict() for k, m in self.models.items()},
                "system": {"status": verdict(self.system), "checks": [c.to_dict() for c in self.system]}}


def exit_code(report: HealthReport) -> int:
    return EXIT_CODES[report.status]


def probe(endpoint: EndpointLike, hc: "HealthCheckConfig", *, prompts: Optional[Sequence[str]] = None,
          files: bool = True, api_key: Optional[str] = None) -> list[Check]:
    """Every per-endpoint check; ``prompts=[]`` skips the model test (a bare readiness probe),
    ``files=False`` skips hashing the GGUF, ``api_key`` is sent as ``Authorization: Bearer``.
    Limits left at ``auto`` are set for the served file's size and this machine's cores."""
    hc = health_limits(hc, model_bytes(endpoint.gguf_path, getattr(endpoint, "lora_path", None)), cpu_budget())
    checks = file_checks(endpoint) if files else []
    client = client_for(endpoint, api_key)
    port = port_check(client, endpoint, hc)
    checks.append(port)
    prompts = list(hc.test_prompts if prompts is None else prompts)
    model_id = None
    if port.status == FAIL:
        checks.append(Check("api.models", SKIP, "not run: the port is unreachable"))
    else:
        models, model_id = models_check(client, endpoint, hc)
        checks.append(models)
    if prompts:
        if model_id is None:
            checks.append(Check("model.completion", SKIP, "not run: the API checks failed"))
        else:
            checks.extend(model_checks(endpoint, hc, model_id, prompts, client=client))
    checks.append(process_check(endpoint))
    return checks


def _key(ep: EndpointLike, taken: dict) -> str:
    return ep.model if ep.model not in taken else f"{ep.model}@{ep.format or ep.port}"


def check_health(cfg: "Config", models: Optional[Sequence[str]] = None, *,
                 endpoints: Optional[Sequence[EndpointLike]] = None,
                 include_model_test: bool = True) -> HealthReport:
    """Health of the deployed models and of this machine.

    Without ``models`` every recorded deployment is checked; a model named in ``models`` that has
    no deployment is unhealthy. ``endpoints`` replaces what serving.endpoints() reports. When
    ``deployment.llamacpp.api_key`` is set, every request to an endpoint carries it.
    """
    report = HealthReport(started_at=time.time())
    expected = list(models or [])
    for n in expected:
        cfg.model(n)  # unknown names fail early with the known list
    if endpoints is None:
        endpoints = deployed(cfg, expected or None)
    eps = [e for e in endpoints if not expected or e.model in expected]
    hc = cfg.health_check
    prompts = hc.test_prompts if include_model_test else []
    key = cfg.deployment.llamacpp.api_key
    # Unwrapped only here, on its way into the client's header: no Check, log or report sees it.
    api_key = key.get_secret_value() if key is not None else None
    for ep in eps:
        mh = ModelHealth(ep.model, ep.version, ep.format, ep.base_url,
                         str(ep.gguf_path) if ep.gguf_path else None)
        mh.checks = probe(ep, hc, prompts=prompts, api_key=api_key)
        # the served artifact's fidelity verdict, as the verify stage recorded it
        v = served_fidelity(cfg.pipeline.state_dir, ep.model, ep.sha256)
        mh.checks.append(Check("verify.fidelity", v["status"], v["detail"], v["remedy"], v["metrics"]))
        report.models[_key(ep, report.models)] = mh
    for n in expected:
        if not any(ep.model == n for ep in eps):
            report.models[n] = ModelHealth(n, cfg.models[n].version, checks=[Check(
                "deploy.endpoint", FAIL, f"{n} is not deployed: no server is recorded for it",
                f"deploy it: loradeploy run -m {n}")])
    if not report.models:
        report.system.append(Check("deploy.endpoint", FAIL, "no deployed model to check",
                                   "deploy one: loradeploy run -m NAME"))
    report.system.extend(system_checks(cfg, eps))
    report.finished_at = time.time()
    return report


def check_and_notify(cfg: "Config", models: Optional[Sequence[str]] = None) -> HealthReport:
    """``loradeploy health``: check, then send health_degraded / health_unhealthy through the one
    notifier (with redaction). The pipeline's health stage does not come here: its events flow
    through the pipeline's notifier, so a run never sends one twice."""
    from ..notify import notify_health

    report = check_health(cfg, models)
    notify_health(cfg, report)
    return report
