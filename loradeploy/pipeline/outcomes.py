"""What a run reports: per stage, per model, the whole run; and the callbacks the CLI renders."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..state import FINISHED, Status

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class StageOutcome:
    stage: str
    status: str                  # a state.Status value, or "planned" in a dry run
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    start_rss_mib: float = 0.0
    error: Optional[str] = None
    note: Optional[str] = None
    artifacts: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    exit_code: int = 0           # a failed stage: its error's exit code (errors.py; 3 = disk, memory, lock)

    def to_dict(self) -> dict:
        d = {"status": str(self.status), "seconds": round(self.seconds, 3), "peak_rss_mib": self.peak_rss_mib,
             "start_rss_mib": self.start_rss_mib}
        for k in ("error", "note"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.info:
            d["info"] = self.info
        return d


@dataclass
class ModelOutcome:
    model: str
    stages: dict[str, StageOutcome] = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.status in FINISHED for s in self.stages.values())

    @property
    def degraded(self) -> dict[str, str]:
        """Stages that ran to their end but not ok, with why (an evaluation target down, a slow health)."""
        return {k: s.error or "degraded" for k, s in self.stages.items() if s.status == Status.DEGRADED}

    def to_dict(self) -> dict:
        return {"ok": self.ok, "degraded": self.degraded, "stages": {k: v.to_dict() for k, v in self.stages.items()},
                "artifacts": self.artifacts}


@dataclass
class PipelineResult:
    models: dict[str, ModelOutcome]
    stages: list[str]
    seconds: float
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.models.values())

    @property
    def degraded(self) -> bool:
        return any(m.degraded for m in self.models.values())

    @property
    def exit_code(self) -> int:
        """README "Exit codes": 0 ok; 3 when every failed stage ran out of a resource (disk, memory, a
        lock); 1 for any other failure."""
        if self.ok:
            return 0
        codes = [s.exit_code for m in self.models.values() for s in m.stages.values() if s.status == Status.FAILED]
        return 3 if codes and all(c == 3 for c in codes) else 1

    def to_dict(self) -> dict:
        return {"ok": self.ok, "degraded": self.degraded, "dry_run": self.dry_run, "seconds": round(self.seconds, 3), "stages": self.stages,
                "models": {k: v.to_dict() for k, v in self.models.items()}}


class Reporter:
    """Callbacks the CLI renders; library code never prints."""

    def stage_started(self, model: str, stage: str) -> None: ...
    def stage_finished(self, model: str, stage: str, outcome: StageOutcome) -> None: ...
    def progress(self, model: str, stage: str, description: str, completed: float, total: float) -> None: ...


def write_summary(cfg: "Config", result: PipelineResult) -> None:
    path = Path(cfg.logging.log_dir) / "pipeline_summary.log"
    lines = [f"== run {time.strftime('%Y-%m-%d %H:%M:%S')} ({result.seconds:.1f}s) {'OK' if result.ok else 'FAILED'}"]
    lines.append(f"{'model':<16}{'stage':<10}{'status':<12}{'seconds':>9}{'peak MiB':>10}  note")
    for name, mo in result.models.items():
        for s, o in mo.stages.items():
            lines.append(f"{name:<16}{s:<10}{str(o.status):<12}{o.seconds:>9.1f}{o.peak_rss_mib:>10.0f}  "
                         f"{o.error or o.note or ''}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
