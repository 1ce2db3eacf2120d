"""Which stages run, in which phases, and what each stage reads from the ones before it."""
from __future__ import annotations

from typing import Sequence

from ..config import STAGES, Config
from ..errors import ConfigError, GGUFError, InputError, ResourceError, StageUnavailable
from ..paths import ModelPaths
from ..stagespec import NEEDS, PHASES  # noqa: F401  (derived from stagespec.SPECS: phases, what each reads)

# Errors a retry cannot fix: the input is what it is.
NO_RETRY = (ConfigError, InputError, GGUFError, StageUnavailable, ResourceError)


def plan_stages(cfg: Config, *, from_stage: str | None = None, skip: Sequence[str] = (),
                only: Sequence[str] = ()) -> list[str]:
    for s in [from_stage, *skip, *only]:
        if s is not None and s not in STAGES:
            raise InputError(f"unknown stage {s!r}", hint=f"stages are: {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in (only or cfg.pipeline.stages)]
    if from_stage:
        stages = [s for s in stages if STAGES.index(s) >= STAGES.index(from_stage)]
    stages = [s for s in stages if s not in skip]
    if not stages:
        raise InputError("no stage left to run", hint="check --only / --skip-stage / pipeline.stages")
    return stages


def model_paths(cfg: Config, name: str) -> ModelPaths:
    return ModelPaths.of(cfg, name)
