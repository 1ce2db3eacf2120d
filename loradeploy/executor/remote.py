"""The body of a Ray task: one heavy stage of one model, run on whichever node Ray chose.

It gets everything as arguments (its own copy of the config, the upstream records) and returns
what it wrote; it touches no run record, lock or notification — those stay with the driver. Its
artifacts are written as every stage writes them (temporary name, fsync, rename) on the shared
storage, so a node that dies mid-write leaves only a temporary, which never counts.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import LoradeployError
from ..paths import ModelPaths
from ..resources import PeakRSS
from ..stages import get_stage
from ..stages.base import StageContext
from .logs import RemoteLog


@dataclass
class TaskSpec:
    cfg: Config                  # the task's copy: paths on the storage, budgets within its reservation
    model: str
    stage: str
    upstream: dict[str, dict]
    options: dict[str, Any]
    log_path: Path
    progress_path: Path
    request: str = ""            # what Ray reserved, for the log


def _here() -> tuple[str, int]:
    import ray
    return ray.get_runtime_context().get_node_id(), os.getpid()


def _redactor(cfg: Config):
    """The run's secret scrubber, so a node's log carries no more than the driver's would."""
    from ..notify import Notifier
    return Notifier.for_config(cfg).redact_filter()


def run_stage_task(spec: TaskSpec) -> dict[str, Any]:
    """Run the stage; return artifacts and info, or the error. Never raises for a stage failure:
    Ray retries only when the worker or node dies, the pipeline decides about the rest."""
    node_id, pid = _here()
    out: dict[str, Any] = {"node_id": node_id, "pid": pid, "started_at": time.time()}
    cfg = spec.cfg
    with RemoteLog(spec.log_path, spec.progress_path, spec.model, spec.stage, cfg.logging.level,
                   redact=_redactor(cfg)) as rl:
        rl.log.info("%s of %s on Ray node %s (pid %d), reserved: %s", spec.stage, spec.model, node_id[:8], pid,
                    spec.request)
        t0 = time.monotonic()
        try:
            obj = get_stage(spec.stage)
            ctx = StageContext(cfg, spec.model, rl.log, spec.log_path, ModelPaths.of(cfg, spec.model),
                               upstream=spec.upstream, progress=rl.progress, options=spec.options)
            with PeakRSS() as peak:
                result = obj.run(ctx)
        except LoradeployError as exc:
            rl.log.error("%s failed on this node: %s", spec.stage, exc.one_line())
            out.update(error=exc, seconds=time.monotonic() - t0)
            return out
        except Exception as exc:  # a bug: keep the traceback in the (carried) log
            rl.log.error("%s crashed:\n%s", spec.stage, traceback.format_exc())
            out.update(crash=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - t0)
            return out
        secs = time.monotonic() - t0
        rl.log.info("%s: done on this node in %.1fs, peak RSS %.0f MiB", spec.stage, secs, peak.peak_mib)
        rl.progress(f"{spec.stage} done", 1, 1)
    out.update(artifacts=[a.to_dict() for a in result.artifacts], info=result.info, seconds=secs, ended_at=time.time(),
               peak_rss_mib=peak.peak_mib, start_rss_mib=round(peak.start / 2**20, 1))
    return out
