"""What a stage is: inputs to hash for resume, and a run that returns the artifacts it wrote."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from ..paths import ModelPaths  # noqa: F401  (stages read their paths from here)
from ..state import Artifact, RunRecord  # noqa: F401  (stages build and return artifacts)

if TYPE_CHECKING:
    from ..config import Config, ModelConfig

# progress(description, completed, total): total 0 means unknown / spinner
ProgressFn = Callable[[str, float, float], None]


def no_progress(description: str, completed: float, total: float) -> None:
    return None


@dataclass
class StageResult:
    artifacts: list[Artifact] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    # why the stage ran to its end but is not ok (an evaluation target down, a degraded health): the
    # run then reports ok: false and the stage "degraded", and the next run does it again
    degraded: Optional[str] = None


@dataclass
class StageContext:
    cfg: "Config"
    model_name: str
    log: logging.Logger
    log_path: Path
    paths: ModelPaths
    upstream: dict[str, dict] = field(default_factory=dict)   # stage name -> its last record
    progress: ProgressFn = no_progress
    options: dict[str, Any] = field(default_factory=dict)      # CLI extras (e.g. instance_id)

    @property
    def model(self) -> "ModelConfig":
        return self.cfg.models[self.model_name]

    @property
    def state_dir(self) -> Path:
        return self.cfg.pipeline.state_dir

    def upstream_artifacts(self, stage: str, kind: str | None = None) -> list[Artifact]:
        return RunRecord(self.state_dir, self.model_name, {"stages": self.upstream}).artifacts(stage, kind)


class Stage(Protocol):
    name: str

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        """JSON-able description of everything the output depends on (hashed for resume)."""

    def run(self, ctx: StageContext) -> StageResult:
        """Do the work; write every artifact atomically; raise a LoradeployError on failure."""
