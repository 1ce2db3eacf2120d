"""Fetch: bring a LoRA adapter from the training box into the work folder, verified.

Remote sources (``ssh://`` or a vast.ai instance) go through system rsync over ssh into a staging
folder beside the adapter folder, which survives failures so a re-run resumes (``staging``); the
box hashes its files while they travel and each received file is checked against that
(``verify``); without rsync on either end, scp does the job file by file (``transfer``). A local
adapter is checked in place (``local``). Where from and which files: ``plan``.

The stage calls ``fetch_inputs`` and ``bring_adapter``; ``fetch_adapter`` / ``fetch_many`` are the
library API.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..paths import ModelPaths
from ..errors import FetchError, LoradeployError, ResourceError
from ..fsutil import sha256_file
from .local import validate_local
from .plan import ALLOWED, OPTIONAL, REQUIRED, Plan, fetch_inputs, plan_for
from .remote import fetch_remote, no_progress
from .staging import METADATA
from .verify import ProgressFn

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["ALLOWED", "METADATA", "OPTIONAL", "REQUIRED", "Fetched", "Plan", "bring_adapter", "fetch_adapter",
           "fetch_inputs", "fetch_many", "fetch_remote", "plan_for", "validate_local"]


@dataclass
class Fetched:
    """What the stage records: adapter files (with their SHA-256 when already known), the metadata
    file a remote fetch wrote, and the stage's info fields."""
    files: list[tuple[Path, Optional[str]]]
    metadata: Optional[Path] = None
    info: dict[str, Any] = field(default_factory=dict)


def bring_adapter(cfg: "Config", model_name: str, dest: Path, *, instance_id: int | str | None = None,
                  log: logging.Logger, log_path: Path, progress: ProgressFn = no_progress) -> Fetched:
    """The fetch stage's work: validate a local adapter in place, or fetch a remote one into ``dest``."""
    plan = plan_for(cfg, model_name, instance_id)
    if plan.kind == "local":
        return Fetched([(p, None) for p in validate_local(Path(plan.path))],
                       info={"source": "local", "adapter_dir": plan.path})
    dest = Path(dest)
    meta = fetch_remote(cfg, model_name, plan, dest, log=log, log_path=log_path, progress=progress)
    info = {k: meta[k] for k in ("tool", "compression", "remote_path", "seconds", "mib_per_s",
                                 "bytes_transferred", "resumed", "refetched")}
    info.update(source=plan.kind, adapter_dir=str(dest))
    return Fetched([(dest / f["name"], f["sha256"]) for f in meta["files"] or []], dest / METADATA, info)


def fetch_adapter(cfg: "Config", model_name: str, *, instance_id: int | str | None = None,
                  dest: Path | None = None, progress: ProgressFn | None = None,
                  log: logging.Logger | None = None, log_path: Path | None = None) -> dict:
    """Fetch one model's adapter (``loradeploy fetch``); return its metadata.

    A local adapter is only validated; the returned dict then says ``source_kind: local`` and
    lists its files, and nothing is written.
    """
    log = log or logging.getLogger(f"loradeploy.fetch.{model_name}")
    log_path = log_path or Path(cfg.logging.log_dir) / model_name / "fetch.log"
    plan = plan_for(cfg, model_name, instance_id)
    if plan.kind == "local":
        files = validate_local(Path(plan.path))
        return {"model": model_name, "source": plan.source, "source_kind": "local", "adapter_dir": plan.path,
                "files": [{"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)} for p in files]}
    dest = Path(dest) if dest is not None else ModelPaths.of(cfg, model_name).adapter
    return fetch_remote(cfg, model_name, plan, dest, log=log, log_path=log_path, progress=progress or no_progress)


def fetch_many(cfg: "Config", names: list[str], *, instance_id: int | str | None = None,
               progress: ProgressFn | None = None, log: logging.Logger | None = None) -> dict[str, dict]:
    """Fetch several adapters, ``performance.parallel_downloads`` at a time.

    Every fetch runs to its end; if any failed, a FetchError naming each failure is raised after
    the others finished, with the successful metadata on its ``results`` attribute.
    """
    results: dict[str, dict] = {}
    errors: dict[str, LoradeployError] = {}
    workers = max(1, min(len(names), cfg.performance.parallel_downloads))

    def one(name: str) -> None:
        try:
            results[name] = fetch_adapter(cfg, name, instance_id=instance_id, progress=progress,
                                          log=(log.getChild(name) if log else None))
        except LoradeployError as exc:
            errors[name] = exc

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch") as pool:
        list(pool.map(one, names))
    if errors:
        first = next(iter(errors.values()))
        err_cls = ResourceError if all(isinstance(e, ResourceError) for e in errors.values()) else FetchError
        detail = "; ".join(f"{n}: {e.one_line()}" for n, e in errors.items())
        err = err_cls(f"{len(errors)} of {len(names)} fetches failed: {detail}", hint=first.hint)
        err.results = results  # type: ignore[attr-defined]
        raise err
    return results
