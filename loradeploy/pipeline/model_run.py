"""One model's stages: skip what is current (same inputs hash, outputs intact), run and record the rest."""
from __future__ import annotations

import time
import traceback
from pathlib import Path

from .. import cleanup
from ..config import Config
from ..errors import LoradeployError, StageUnavailable
from ..executor.local import LocalExecutor
from ..logsetup import pipeline_logger, stage_logger
from ..resources import PeakRSS
from ..stages import get_stage
from ..stages.base import StageContext
from ..state import COMPLETED, FINISHED, RunRecord, Status, inputs_hash
from .outcomes import ModelOutcome, Reporter, StageOutcome
from .plan import NEEDS, NO_RETRY, model_paths


class ModelRun:
    def __init__(self, cfg: Config, name: str, stages: list[str], *, force: bool, redo: set[str],
                 options: dict, reporter: Reporter, notifier=None, executor=None):
        self.notifier = notifier
        self.executor = executor or LocalExecutor()  # where stage.run happens (this process, or a Ray node)
        self.cfg, self.name, self.stages, self.force, self.redo = cfg, name, stages, force, redo
        self.options, self.reporter = options, reporter
        self.log = pipeline_logger(cfg.logging.log_dir, cfg.logging.level)
        self.record = RunRecord.load(cfg.pipeline.state_dir, name, self.log)
        self.outcome = ModelOutcome(name)
        self.paths = model_paths(cfg, name)

    def ctx(self, stage: str, log, log_path: Path) -> StageContext:
        def progress(desc: str, done: float, total: float) -> None:
            self.reporter.progress(self.name, stage, desc, done, total)
        return StageContext(self.cfg, self.name, log, log_path, self.paths,
                            upstream=dict(self.record.stages), progress=progress, options=self.options)

    def current(self, stage: str, obj, ctx: StageContext) -> tuple[bool, str]:
        rec = self.record.stage(stage)
        if rec.get("status") not in FINISHED:
            return False, "no finished record"
        if rec.get("inputs_hash") != inputs_hash(obj.inputs(ctx)):
            return False, "inputs changed"
        if not self.record.intact(stage):
            if rec.get("cleaned"):
                return True, "outputs were cleaned up; rebuilt only if a later stage needs them"
            return False, "outputs missing or changed"
        extra = getattr(obj, "is_current", None)
        if extra is not None:
            ok, why = extra(ctx, rec)
            if not ok:
                return False, why
        return True, "inputs unchanged, outputs intact"

    def run_stage(self, stage: str, *, reason: str = "", rebuild: bool = False) -> StageOutcome:
        self.reporter.stage_started(self.name, stage)
        try:
            obj = get_stage(stage)
        except StageUnavailable as exc:
            out = StageOutcome(stage, Status.UNAVAILABLE, error=exc.one_line())
            self._store(stage, out)
            if self.notifier:
                self.notifier.stage_failed(self.name, stage, out.error, "")
            return out
        with stage_logger(self.cfg.logging.log_dir, self.name, stage, self.cfg.logging.level) as (log, log_path):
            ctx = self.ctx(stage, log, log_path)
            try:
                if not self.force and stage not in self.redo and not rebuild:
                    current, why = self.current(stage, obj, ctx)
                    if current:
                        rec = self.record.stage(stage)
                        log.info("%s: skipped (%s)", stage, why)
                        out = StageOutcome(stage, Status.SKIPPED, note=why, artifacts=rec.get("artifacts", []),
                                           info=rec.get("info", {}))
                        self.reporter.stage_finished(self.name, stage, out)
                        return out
                    log.info("%s: running (%s)", stage, reason or why)
                # this stage runs: upstream outputs it reads must exist (rebuild cleaned temporaries)
                if self._ensure_upstream(stage, log):
                    ctx = self.ctx(stage, log, log_path)
                h = inputs_hash(obj.inputs(ctx))
            except LoradeployError as exc:
                return self._fail(stage, exc, log, 0.0, 0.0)
            return self._attempts(stage, obj, ctx, h, log, log_path)

    def _attempts(self, stage: str, obj, ctx: StageContext, h: str, log, log_path: Path) -> StageOutcome:
        attempts = 1 + self.cfg.pipeline.retries
        for attempt in range(1, attempts + 1):
            t0 = time.monotonic()
            started = time.time()
            self.record.set_stage(stage, {"status": str(Status.RUNNING), "started_at": started, "inputs_hash": h,
                                          "artifacts": []})
            self.record.save()
            try:
                with PeakRSS() as peak:
                    ran = self.executor.run(stage, obj, ctx)
            except LoradeployError as exc:
                secs = time.monotonic() - t0
                if isinstance(exc, NO_RETRY) or attempt == attempts:
                    return self._fail(stage, exc, log, secs, peak.peak_mib)
                wait = self.cfg.pipeline.retry_backoff_s * (2 ** (attempt - 1))
                log.warning("%s failed (attempt %d/%d): %s; retrying in %.1fs", stage, attempt, attempts,
                            exc.one_line(), wait)
                time.sleep(wait)
                continue
            except Exception as exc:  # a bug or an unexpected library error: keep the traceback in the log
                log.error("%s crashed:\n%s", stage, traceback.format_exc())
                err = LoradeployError(f"{stage} crashed: {type(exc).__name__}: {exc}", hint=f"see {log_path}")
                return self._fail(stage, err, log, time.monotonic() - t0, 0.0)
            secs = time.monotonic() - t0
            result = ran.result
            # a stage run elsewhere reports the memory it took there; this process's would say nothing
            peak_mib = peak.peak_mib if ran.peak_rss_mib is None else ran.peak_rss_mib
            start_mib = round(peak.start / 2**20, 1) if ran.start_rss_mib is None else ran.start_rss_mib
            status = Status.DEGRADED if result.degraded else Status.DONE
            out = StageOutcome(stage, status, secs, peak_mib, start_mib, note=ran.note,
                               error=result.degraded, artifacts=[a.to_dict() for a in result.artifacts],
                               info=result.info)
            self.record.set_stage(stage, {
                "status": str(status), "inputs_hash": h, "artifacts": out.artifacts, "info": result.info,
                "started_at": started, "ended_at": time.time(), "seconds": round(secs, 3),
                "peak_rss_mib": peak_mib, "estimated_peak_mib": result.info.get("estimated_peak_mib"),
                **({"error": result.degraded} if result.degraded else {}),
            })
            self.record.save()
            est = result.info.get("estimated_peak_mib")
            log.info("%s: %s in %.1fs, peak RSS %.0f MiB%s", stage, status, secs, peak_mib,
                     f" (estimated {est:.0f} MiB)" if est else "")
            if result.degraded:
                log.warning("%s degraded: %s", stage, result.degraded)
                if self.notifier:
                    if stage == "health":
                        self.notifier.health(self.name, "degraded", result.info.get("warnings"))
                    else:
                        self.notifier.stage_failed(self.name, stage, f"degraded: {result.degraded}", str(log_path))
            self.reporter.stage_finished(self.name, stage, out)
            return out
        raise AssertionError("unreachable")

    def _ensure_upstream(self, stage: str, log) -> bool:
        """Rebuild an upstream stage whose outputs were cleaned up, when this stage needs them."""
        rebuilt = False
        for up in NEEDS.get(stage, ()):
            if self.record.stage(up).get("cleaned") and not self.record.intact(up):
                log.info("%s needs %s outputs, which were cleaned up: rebuilding them", stage, up)
                out = self.run_stage(up, reason="needed again by " + stage, rebuild=True)
                if out.status not in COMPLETED:
                    raise LoradeployError(f"could not rebuild {up} outputs needed by {stage}: {out.error}")
                self.outcome.stages[up] = out
                rebuilt = True
        return rebuilt

    def _fail(self, stage: str, exc: LoradeployError, log, secs: float, peak: float) -> StageOutcome:
        msg = exc.one_line()
        log.error("%s failed: %s", stage, msg)
        tail = getattr(exc, "stderr_tail", "")
        if tail:
            log.error("output tail:\n%s", tail)
        out = StageOutcome(stage, Status.FAILED, secs, peak, error=msg, exit_code=exc.exit_code)
        self._store(stage, out)
        self.reporter.stage_finished(self.name, stage, out)
        if self.notifier:
            self.notifier.stage_failed(self.name, stage, msg,
                                       str(Path(self.cfg.logging.log_dir) / self.name / f"{stage}.log"))
        return out

    def _store(self, stage: str, out: StageOutcome) -> None:
        """Record a stage that did not finish: no inputs hash, so it is never taken as current."""
        self.record.set_stage(stage, {"status": str(out.status), "error": out.error, "inputs_hash": None,
                                      "artifacts": [], "ended_at": time.time(), "seconds": out.seconds})
        self.record.save()

    def cleanup(self) -> list[str]:
        """Drop temporaries the config does not keep (the same rules as `loradeploy clean`)."""
        if not self.cfg.pipeline.cleanup:
            return []
        return [d["path"] for d in cleanup.remove(self.record, cleanup.temporaries(self.cfg, self.record,
                                                                                     after_run=True))]

    def ggufs(self) -> list[dict]:
        return [{"path": a.path, "format": a.format, "size": a.size, "sha256": a.sha256} for a in self.record.ggufs()]
