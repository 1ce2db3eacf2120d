"""run_pipeline: plan, then execute every model's stages phase by phase, with one notifier."""
from __future__ import annotations

import concurrent.futures as cf
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .. import cleanup
from ..config import Config
from ..errors import LoradeployError
from ..executor import get_executor
from ..logsetup import pipeline_logger, prune_logs, use_redaction
from ..notify import Notifier
from ..stages import get_stage
from ..stagespec import side_by_side as network_bound
from ..state import ModelLock, Status
from .model_run import ModelRun
from .outcomes import ModelOutcome, PipelineResult, Reporter, StageOutcome, write_summary
from .plan import PHASES, plan_stages


def make_notifier(cfg: Config, log) -> Notifier:
    """The run's one notifier (it never raises, and sends nothing when no channel is active).

    Its redactor also guards every log file of the run, notifications on or off: the config's secrets
    (the server's api_key on a command line, a webhook URL in an error) must not reach a log either.
    """
    n = Notifier.for_config(cfg, log=log)
    use_redaction(n.redact_filter())
    return n


def _dry_run(cfg: Config, names: list[str], stages: list[str], runs: dict[str, ModelRun], force: bool,
             redo: set[str], log) -> dict[str, ModelOutcome]:
    out = {}
    for n in names:
        mo = ModelOutcome(n)
        for s in stages:
            try:
                obj = get_stage(s)
                ctx = runs[n].ctx(s, log, Path(cfg.logging.log_dir) / n / f"{s}.log")
                cur, why = (False, "--force") if force or s in redo else runs[n].current(s, obj, ctx)
                mo.stages[s] = StageOutcome(s, Status.SKIPPED if cur else "planned", note=why)
            except LoradeployError as exc:
                mo.stages[s] = StageOutcome(s, Status.UNAVAILABLE, error=exc.one_line())
        out[n] = mo
    return out


def _execute(cfg: Config, names: list[str], stages: list[str], runs: dict[str, ModelRun], executor) -> None:
    alive = {n: True for n in names}
    failed_any = False

    def run_one(mr: ModelRun, todo: list[str]) -> bool:
        for s in todo:
            out = mr.run_stage(s)
            mr.outcome.stages[s] = out
            if out.status in (Status.FAILED, Status.UNAVAILABLE):
                for later in stages[stages.index(s) + 1:]:
                    mr.outcome.stages[later] = StageOutcome(later, Status.NOT_RUN, note=f"{s} failed")
                return False
        return True

    def halted() -> bool:
        return failed_any and not cfg.pipeline.continue_on_error

    for phase in PHASES:
        todo = [s for s in stages if s in phase]
        if not todo:
            continue
        ready = [n for n in names if alive[n]]
        # side by side: fetches (network-bound), and whatever the executor packs (Ray: by resources)
        side_by_side = network_bound(phase) or executor.packs(phase)
        if side_by_side and len(ready) > 1 and not halted():
            width = cfg.performance.parallel_downloads if network_bound(phase) else len(ready)
            workers = max(1, min(width, len(ready)))
            with cf.ThreadPoolExecutor(workers) as pool:
                futs = {pool.submit(run_one, runs[n], todo): n for n in ready}
                for f in cf.as_completed(futs):
                    alive[futs[f]] = f.result()
        else:
            for n in ready:
                if halted():
                    for s in todo:
                        runs[n].outcome.stages.setdefault(s, StageOutcome(s, Status.NOT_RUN,
                                                                          note="an earlier model failed"))
                    continue
                alive[n] = run_one(runs[n], todo)
                failed_any = failed_any or not alive[n]
        failed_any = failed_any or not all(alive[n] for n in ready)


def run_pipeline(cfg: Config, models: Sequence[str], *, from_stage: str | None = None, skip: Sequence[str] = (),
                 only: Sequence[str] = (), force: bool = False, dry_run: bool = False,
                 options: Optional[dict[str, Any]] = None, reporter: Optional[Reporter] = None) -> PipelineResult:
    """Run the planned stages for each model. Returns outcomes; raises only for bad arguments."""
    reporter = reporter or Reporter()
    executor = get_executor(cfg)
    cfg = executor.run_config(cfg)
    names = list(models) or [n for n, m in cfg.models.items() if m.enabled]
    for n in names:
        cfg.model(n)
    stages = plan_stages(cfg, from_stage=from_stage, skip=skip, only=only)
    redo = set(stages) if from_stage else set()
    t0 = time.monotonic()
    log = pipeline_logger(cfg.logging.log_dir, cfg.logging.level)
    notifier = make_notifier(cfg, log)
    for w in cfg.warnings:  # shown by the CLI at load; kept in the run's log too
        log.warning("config: %s", w)
    prune_logs(cfg.logging.log_dir, cfg.logging.retention_days)
    result = PipelineResult({}, stages, 0.0, dry_run)

    def model_runs(with_notifier) -> dict[str, ModelRun]:
        return {n: ModelRun(cfg, n, stages, force=force, redo=redo, options=dict(options or {}), reporter=reporter,
                            notifier=with_notifier, executor=executor) for n in names}

    if dry_run:
        result.models = _dry_run(cfg, names, stages, model_runs(None), force, redo, log)
        result.seconds = time.monotonic() - t0
        return result

    log.info("run started: models=%s stages=%s force=%s", names, stages, force)
    notifier.run_started(names)
    locks = []
    try:
        for n in names:
            locks.append(ModelLock(cfg.pipeline.state_dir, n).acquire())
            for item in cleanup.remove_stale(cfg, n):   # a killed run's partial files, now that none can run
                log.info("%s: removed %s (%s, %d bytes)", n, item["path"], item["what"], item["size"])
        runs = model_runs(notifier)
        executor.start()
        _execute(cfg, names, stages, runs, executor)
        for n in names:
            mr = runs[n]
            if mr.outcome.ok:
                removed = mr.cleanup()
                if removed:
                    log.info("%s: cleaned up %s", n, ", ".join(removed))
            mr.outcome.artifacts = mr.ggufs()
            result.models[n] = mr.outcome
    finally:
        executor.close()
        for lk in locks:
            lk.release()
    result.seconds = time.monotonic() - t0
    log.info("run finished in %.1fs: %s", result.seconds, "ok" if result.ok else "FAILED")
    write_summary(cfg, result)
    if notifier.channels():
        rows = [{"model": n, "stage": st, "status": str(o.status), "seconds": f"{o.seconds:.1f}",
                 "peak MiB": f"{o.peak_rss_mib:.0f}", "note": (o.error or "")[:200]} for n, mo in result.models.items() for st, o in mo.stages.items()]
        notifier.run_finished(rows, result.ok)
    return result
