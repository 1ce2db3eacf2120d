"""Per-model, per-stage log files plus pipeline.log; retention by age; one redaction filter on all of them."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FMT = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
# The filter that scrubs secrets from every file this module writes (set by use_redaction). One slot,
# not a list: a second run in the same process replaces the first run's filter instead of stacking.
_redaction: list[logging.Filter] = []


def use_redaction(flt: logging.Filter) -> None:
    """Scrub every record that reaches pipeline.log or a stage log with ``flt`` from now on."""
    log = logging.getLogger("loradeploy")
    for h in log.handlers:
        for old in _redaction:
            h.removeFilter(old)
        h.addFilter(flt)
    _redaction[:] = [flt]


def _filtered(h: logging.Handler) -> logging.Handler:
    for flt in _redaction:
        h.addFilter(flt)
    return h


def pipeline_logger(log_dir: Path, level: str) -> logging.Logger:
    log = logging.getLogger("loradeploy")
    log.setLevel(level)
    log.propagate = False
    target = str(Path(log_dir) / "pipeline.log")
    if not any(getattr(h, "baseFilename", None) == target for h in log.handlers):
        for h in list(log.handlers):
            if isinstance(h, logging.FileHandler) and h.baseFilename.endswith("pipeline.log"):
                log.removeHandler(h)
                h.close()
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(target)
        fh.setFormatter(FMT)
        log.addHandler(_filtered(fh))
    return log


def stage_log_path(log_dir: Path, model: str, stage: str) -> Path:
    return Path(log_dir) / model / f"{stage}.log"


@contextmanager
def stage_logger(log_dir: Path, model: str, stage: str, level: str) -> Iterator[tuple[logging.Logger, Path]]:
    """A child of the pipeline logger that also writes to log_dir/<model>/<stage>.log."""
    pipeline_logger(log_dir, level)
    path = stage_log_path(log_dir, model, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger(f"loradeploy.{model}.{stage}")
    log.setLevel(level)
    fh = logging.FileHandler(path)
    fh.setFormatter(FMT)
    # Its own filter too: a record reaches this handler before it propagates to pipeline.log's.
    log.addHandler(_filtered(fh))
    try:
        yield log, path
    finally:
        log.removeHandler(fh)
        fh.close()


def prune_logs(log_dir: Path, retention_days: int) -> list[Path]:
    """Delete log files older than retention_days (0 keeps all). Returns what was removed."""
    if retention_days <= 0 or not Path(log_dir).exists():
        return []
    cutoff = time.time() - retention_days * 86400
    removed = []
    for p in Path(log_dir).rglob("*.log*"):
        try:
            if p.is_file() and p.stat().st_mtime < cutoff:
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed
