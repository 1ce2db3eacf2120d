"""What every health check produces: a Check with a status, and the verdict over many.

Its own module (not check.py) because files, api and system all build Checks and check.py runs
them: keeping the shared types here is what keeps the imports one-way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Protocol

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
EXIT_CODES = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}
GIB = 1024 ** 3
MIB = 1024 ** 2


class EndpointLike(Protocol):
    """What serving.endpoints() returns; any object with these attributes will do."""
    model: str
    version: Optional[str]
    format: Optional[str]
    base_url: str
    port: int
    pid: Optional[int]
    gguf_path: Optional[str | os.PathLike]
    sha256: Optional[str]


@dataclass
class Check:
    name: str
    status: str                       # pass | warn | fail | skip (skip never changes the verdict)
    detail: str
    remedy: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.remedy:
            d["remedy"] = self.remedy
        if self.metrics:
            d["metrics"] = self.metrics
        return d


def verdict(checks: Iterable[Check]) -> str:
    statuses = {c.status for c in checks}
    if FAIL in statuses:
        return UNHEALTHY
    return DEGRADED if WARN in statuses else HEALTHY


def restart_hint(endpoint: EndpointLike) -> str:
    return (f"restart it: loradeploy serve start -m {endpoint.model}; "
            f"its log: loradeploy serve logs -m {endpoint.model}")
