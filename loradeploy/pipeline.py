"""Plan which stages run for which models, then execute them with resume, retries and records."""
from __future__ import annotations

import concurrent.futures as cf
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import STAGES, Config
from .errors import ConfigError, InputError, GGUFError, LoradeployError, ResourceError, StageUnavailable
from .fsutil import remove_path
from .logsetup import pipeline_logger, prune_logs, stage_logger, use_redaction
from .notify import Notifier
from .resources import PeakRSS
from .stages import get_stage
from .stages.base import Artifact, ModelPaths, StageContext
from .state import ModelLock, inputs_hash, load_record, save_record

# Errors a retry cannot fix: the input is what it is.
NO_RETRY = (ConfigError, InputError, GGUFError, StageUnavailable, ResourceError)
# Which stage's outputs a stage reads (so a cleaned-up temporary is rebuilt when needed).
PHASES: tuple[tuple[str, ...], ...] = (("fetch",), ("merge", "convert", "quantize"), ("deploy", "health"),
                                       ("evaluate",))
NEEDS: dict[str, tuple[str, ...]] = {
    "merge": ("fetch",), "convert": ("merge",), "quantize": ("convert",),
    "deploy": ("quantize",), "health": ("deploy",), "evaluate": ("deploy",),
}


@dataclass
class StageOutcome:
    stage: str
    status: str                  # done | skipped | failed | unavailable | not_run
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    start_rss_mib: float = 0.0
    error: Optional[str] = None
    note: Optional[str] = None
    artifacts: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"status": self.status, "seconds": round(self.seconds, 3), "peak_rss_mib": self.peak_rss_mib,
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
        return all(s.status in ("done", "skipped") for s in self.stages.values())

    def to_dict(self) -> dict:
        return {"ok": self.ok, "stages": {k: v.to_dict() for k, v in self.stages.items()},
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

    def to_dict(self) -> dict:
        return {"ok": self.ok, "dry_run": self.dry_run, "seconds": round(self.seconds, 3), "stages": self.stages,
                "models": {k: v.to_dict() for k, v in self.models.items()}}


class Reporter:
    """Callbacks the CLI renders; library code never prints."""

    def stage_started(self, model: str, stage: str) -> None: ...
    def stage_finished(self, model: str, stage: str, outcome: StageOutcome) -> None: ...
    def progress(self, model: str, stage: str, description: str, completed: float, total: float) -> None: ...


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
    return ModelPaths(cfg.pipeline.work_dir / name, name, cfg.models[name].version)


def make_notifier(cfg: Config, log) -> Notifier:
    """The run's one notifier (it never raises, and sends nothing when no channel is active).

    Its redactor also guards every log file of the run, notifications on or off: the config's secrets
    (the server's api_key on a command line, a webhook URL in an error) must not reach a log either.
    """
    n = Notifier.for_config(cfg, log=log)
    use_redaction(n.redact_filter())
    return n


class _ModelRun:
    def __init__(self, cfg: Config, name: str, stages: list[str], *, force: bool, redo: set[str],
                 options: dict, reporter: Reporter, notifier=None):
        self.notifier = notifier
        self.cfg, self.name, self.stages, self.force, self.redo = cfg, name, stages, force, redo
        self.options, self.reporter = options, reporter
        self.log = pipeline_logger(cfg.logging.log_dir, cfg.logging.level)
        self.record = load_record(cfg.pipeline.state_dir, name, self.log)
        self.outcome = ModelOutcome(name)
        self.paths = model_paths(cfg, name)

    # --- helpers -----------------------------------------------------------------------------
    def _ctx(self, stage: str, log, log_path: Path) -> StageContext:
        def progress(desc: str, done: float, total: float) -> None:
            self.reporter.progress(self.name, stage, desc, done, total)
        return StageContext(self.cfg, self.name, log, log_path, self.paths,
                            upstream=dict(self.record["stages"]), progress=progress, options=self.options)

    def _intact(self, rec: dict) -> bool:
        return all(Artifact(**a).intact() for a in rec.get("artifacts", []))

    def _current(self, stage: str, obj, ctx: StageContext) -> tuple[bool, str]:
        rec = self.record["stages"].get(stage)
        if not rec or rec.get("status") not in ("done", "skipped"):
            return False, "no finished record"
        if rec.get("inputs_hash") != inputs_hash(obj.inputs(ctx)):
            return False, "inputs changed"
        if not self._intact(rec):
            if rec.get("cleaned"):
                return True, "outputs were cleaned up; rebuilt only if a later stage needs them"
            return False, "outputs missing or changed"
        extra = getattr(obj, "is_current", None)
        if extra is not None:
            ok, why = extra(ctx, rec)
            if not ok:
                return False, why
        return True, "inputs unchanged, outputs intact"

    # --- execution ---------------------------------------------------------------------------
    def run_stage(self, stage: str, *, reason: str = "", rebuild: bool = False) -> StageOutcome:
        self.reporter.stage_started(self.name, stage)
        try:
            obj = get_stage(stage)
        except StageUnavailable as exc:
            out = StageOutcome(stage, "unavailable", error=exc.one_line())
            self._store(stage, out)
            if self.notifier:
                self.notifier.stage_failed(self.name, stage, out.error, "")
            return out
        with stage_logger(self.cfg.logging.log_dir, self.name, stage, self.cfg.logging.level) as (log, log_path):
            ctx = self._ctx(stage, log, log_path)
            try:
                if not self.force and stage not in self.redo and not rebuild:
                    current, why = self._current(stage, obj, ctx)
                    if current:
                        rec = self.record["stages"][stage]
                        log.info("%s: skipped (%s)", stage, why)
                        out = StageOutcome(stage, "skipped", note=why, artifacts=rec.get("artifacts", []),
                                           info=rec.get("info", {}))
                        self.reporter.stage_finished(self.name, stage, out)
                        return out
                    log.info("%s: running (%s)", stage, reason or why)
                # this stage runs: upstream outputs it reads must exist (rebuild cleaned temporaries)
                if self._ensure_upstream(stage, log):
                    ctx = self._ctx(stage, log, log_path)
                h = inputs_hash(obj.inputs(ctx))
            except LoradeployError as exc:
                return self._fail(stage, exc, log, 0.0, 0.0)
            attempts = 1 + self.cfg.pipeline.retries
            for attempt in range(1, attempts + 1):
                t0 = time.monotonic()
                started = time.time()
                self.record["stages"][stage] = {"status": "running", "started_at": started, "inputs_hash": h,
                                                "artifacts": []}
                save_record(self.cfg.pipeline.state_dir, self.name, self.record)
                try:
                    with PeakRSS() as peak:
                        result = obj.run(ctx)
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
                    err = LoradeployError(f"{stage} crashed: {type(exc).__name__}: {exc}",
                                          hint=f"see {log_path}")
                    return self._fail(stage, err, log, time.monotonic() - t0, 0.0)
                secs = time.monotonic() - t0
                out = StageOutcome(stage, "done", secs, peak.peak_mib, round(peak.start / 2**20, 1),
                                   artifacts=[a.to_dict() for a in result.artifacts], info=result.info)
                self.record["stages"][stage] = {
                    "status": "done", "inputs_hash": h, "artifacts": out.artifacts, "info": result.info,
                    "started_at": started, "ended_at": time.time(), "seconds": round(secs, 3),
                    "peak_rss_mib": peak.peak_mib,
                }
                save_record(self.cfg.pipeline.state_dir, self.name, self.record)
                log.info("%s: done in %.1fs, peak RSS %.0f MiB", stage, secs, peak.peak_mib)
                if stage == "health" and self.notifier and result.info.get("status") == "degraded":
                    self.notifier.health(self.name, "degraded", result.info.get("warnings"))
                self.reporter.stage_finished(self.name, stage, out)
                return out
        raise AssertionError("unreachable")

    def _ensure_upstream(self, stage: str, log) -> bool:
        """Rebuild an upstream stage whose outputs were cleaned up, when this stage needs them."""
        rebuilt = False
        for up in NEEDS.get(stage, ()):
            rec = self.record["stages"].get(up)
            if rec and rec.get("cleaned") and not self._intact(rec):
                log.info("%s needs %s outputs, which were cleaned up: rebuilding them", stage, up)
                out = self.run_stage(up, reason="needed again by " + stage, rebuild=True)
                if out.status not in ("done", "skipped"):
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
        out = StageOutcome(stage, "failed", secs, peak, error=msg)
        self._store(stage, out)
        self.reporter.stage_finished(self.name, stage, out)
        if self.notifier:
            self.notifier.stage_failed(self.name, stage, msg,
                                       str(Path(self.cfg.logging.log_dir) / self.name / f"{stage}.log"))
        return out

    def _store(self, stage: str, out: StageOutcome) -> None:
        """Record a stage that did not finish: no inputs hash, so it is never taken as current."""
        self.record["stages"][stage] = {"status": out.status, "error": out.error, "inputs_hash": None,
                                        "artifacts": [], "ended_at": time.time(), "seconds": out.seconds}
        save_record(self.cfg.pipeline.state_dir, self.name, self.record)

    def cleanup(self) -> list[str]:
        """Drop temporaries the config does not keep; mark their records 'cleaned'."""
        removed = []
        if not self.cfg.pipeline.cleanup:
            return removed
        conv = self.record["stages"].get("convert", {})
        merge = self.record["stages"].get("merge", {})
        if (not self.cfg.merge.save_merged_hf and merge.get("status") in ("done", "skipped")
                and conv.get("status") in ("done", "skipped") and self._intact(conv)):
            for a in merge.get("artifacts", []):
                if a["kind"] == "merged_hf" and Path(a["path"]).exists():
                    remove_path(Path(a["path"]))
                    removed.append(a["path"])
            merge["cleaned"] = True
        quant = self.record["stages"].get("quantize", {})
        if (not self.cfg.quantization.keep_f16 and quant.get("status") in ("done", "skipped")
                and self._intact(quant)):
            for a in conv.get("artifacts", []):
                if a["kind"] == "gguf" and Path(a["path"]).exists():
                    remove_path(Path(a["path"]))
                    removed.append(a["path"])
            conv["cleaned"] = True
        if removed:
            save_record(self.cfg.pipeline.state_dir, self.name, self.record)
        return removed


def _collect_artifacts(record: dict) -> list[dict]:
    arts = []
    for stage in ("convert", "quantize"):
        for a in (record["stages"].get(stage) or {}).get("artifacts", []):
            if a.get("kind") == "gguf" and Path(a["path"]).exists():
                arts.append({k: a[k] for k in ("path", "format", "size", "sha256")})
    return arts


def run_pipeline(cfg: Config, models: Sequence[str], *, from_stage: str | None = None, skip: Sequence[str] = (),
                 only: Sequence[str] = (), force: bool = False, dry_run: bool = False,
                 options: Optional[dict[str, Any]] = None, reporter: Optional[Reporter] = None) -> PipelineResult:
    """Run the planned stages for each model. Returns outcomes; raises only for bad arguments."""
    reporter = reporter or Reporter()
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
    if dry_run:
        for n in names:
            mr = _ModelRun(cfg, n, stages, force=force, redo=redo, options=dict(options or {}), reporter=reporter)
            mo = ModelOutcome(n)
            for s in stages:
                try:
                    obj = get_stage(s)
                    ctx = mr._ctx(s, log, Path(cfg.logging.log_dir) / n / f"{s}.log")
                    cur, why = (False, "--force") if force or s in redo else mr._current(s, obj, ctx)
                    mo.stages[s] = StageOutcome(s, "skipped" if cur else "planned", note=why)
                except LoradeployError as exc:
                    mo.stages[s] = StageOutcome(s, "unavailable", error=exc.one_line())
            result.models[n] = mo
        result.seconds = time.monotonic() - t0
        return result

    log.info("run started: models=%s stages=%s force=%s", names, stages, force)
    notifier.run_started(names)
    locks = []
    try:
        for n in names:
            locks.append(ModelLock(cfg.pipeline.state_dir, n).acquire())
        runs = {n: _ModelRun(cfg, n, stages, force=force, redo=redo, options=dict(options or {}), reporter=reporter,
                             notifier=notifier)
                for n in names}
        failed_any = False

        def run_one(mr: _ModelRun, todo: list[str]) -> bool:
            for s in todo:
                out = mr.run_stage(s)
                mr.outcome.stages[s] = out
                if out.status in ("failed", "unavailable"):
                    for later in stages[stages.index(s) + 1:]:
                        mr.outcome.stages[later] = StageOutcome(later, "not_run", note=f"{s} failed")
                    return False
            return True

        # Phases across models: fetches side by side (network-bound); the heavy build stages one
        # model at a time (so two merges never compete for RAM); then every deploy + health check;
        # evaluation last, when every model serves.
        alive = {n: True for n in names}

        def halted() -> bool:
            return failed_any and not cfg.pipeline.continue_on_error

        for phase in PHASES:
            todo = [s for s in stages if s in phase]
            if not todo:
                continue
            ready = [n for n in names if alive[n]]
            if phase == ("fetch",) and len(ready) > 1 and not halted():
                workers = max(1, min(cfg.performance.parallel_downloads, len(ready)))
                with cf.ThreadPoolExecutor(workers) as pool:
                    futs = {pool.submit(run_one, runs[n], todo): n for n in ready}
                    for f in cf.as_completed(futs):
                        alive[futs[f]] = f.result()
            else:
                for n in ready:
                    if halted():
                        for s in todo:
                            runs[n].outcome.stages.setdefault(s, StageOutcome(s, "not_run", note="an earlier model failed"))
                        continue
                    alive[n] = run_one(runs[n], todo)
                    failed_any = failed_any or not alive[n]
            failed_any = failed_any or not all(alive[n] for n in ready)
        for n in names:
            mr = runs[n]
            if mr.outcome.ok:
                removed = mr.cleanup()
                if removed:
                    log.info("%s: cleaned up %s", n, ", ".join(removed))
            mr.outcome.artifacts = _collect_artifacts(mr.record)
            result.models[n] = mr.outcome
    finally:
        for lk in locks:
            lk.release()
    result.seconds = time.monotonic() - t0
    log.info("run finished in %.1fs: %s", result.seconds, "ok" if result.ok else "FAILED")
    _write_summary(cfg, result)
    if notifier.channels():
        rows = [{"model": n, "stage": st, "status": o.status, "seconds": f"{o.seconds:.1f}",
                 "peak MiB": f"{o.peak_rss_mib:.0f}"} for n, mo in result.models.items() for st, o in mo.stages.items()]
        notifier.run_finished(rows, result.ok)
    return result


def _write_summary(cfg: Config, result: PipelineResult) -> None:
    path = Path(cfg.logging.log_dir) / "pipeline_summary.log"
    lines = [f"== run {time.strftime('%Y-%m-%d %H:%M:%S')} ({result.seconds:.1f}s) {'OK' if result.ok else 'FAILED'}"]
    lines.append(f"{'model':<16}{'stage':<10}{'status':<12}{'seconds':>9}{'peak MiB':>10}  note")
    for name, mo in result.models.items():
        for s, o in mo.stages.items():
            lines.append(f"{name:<16}{s:<10}{o.status:<12}{o.seconds:>9.1f}{o.peak_rss_mib:>10.0f}  "
                         f"{o.error or o.note or ''}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
