"""Fetch: bring a LoRA adapter from the training box into the work folder, verified.

Remote sources (``ssh://`` or a vast.ai instance) go through system rsync over ssh into a staging
folder beside the adapter folder, which survives failures so a re-run resumes (``staging``); the
box hashes its files while they travel and each received file is checked against that
(``verify``); without rsync on either end, scp does the job file by file (``transfer``). A local
adapter is checked in place (``local``). Where from and which files: ``plan``.

``fetch_adapter`` is the one entry point: the fetch stage (``loradeploy fetch`` / ``loradeploy run``)
calls it, and so do the tests and bench; ``fetch_inputs`` is what the stage hashes for resume. Several
models fetch side by side in the pipeline's fetch phase (``performance.parallel_downloads`` at a time).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..paths import ModelPaths, stage_log_path
from .local import validate_local
from .plan import Plan, fetch_inputs, plan_for
from .remote import fetch_remote, no_progress
from .staging import METADATA
from .verify import ProgressFn

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["Fetched", "Plan", "fetch_adapter", "fetch_inputs", "plan_for"]


@dataclass
class Fetched:
    """What a fetch gives back: adapter files (with their SHA-256 when already known), the metadata file a
    remote fetch wrote and its content (``meta``; empty for a local adapter), and the stage's info fields."""
    files: list[tuple[Path, Optional[str]]]
    metadata: Optional[Path] = None
    info: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def fetch_adapter(cfg: "Config", model_name: str, dest: Path | None = None, *, instance_id: int | str | None = None,
                  log: logging.Logger | None = None, log_path: Path | None = None,
                  progress: ProgressFn = no_progress) -> Fetched:
    """Fetch one model's adapter: validate a local one in place (nothing is written), or bring a remote one
    into ``dest`` (default: the model's adapter folder), verified, beside its metadata.json."""
    plan = plan_for(cfg, model_name, instance_id)
    if plan.kind == "local":
        return Fetched([(p, None) for p in validate_local(Path(plan.path))],
                       info={"source": "local", "adapter_dir": plan.path})
    dest = Path(dest) if dest is not None else ModelPaths.of(cfg, model_name).adapter
    meta = fetch_remote(cfg, model_name, plan, dest, log=log or logging.getLogger(f"loradeploy.fetch.{model_name}"),
                        log_path=log_path or stage_log_path(cfg.logging.log_dir, model_name, "fetch"),
                        progress=progress)
    info = {k: meta[k] for k in ("tool", "compression", "remote_path", "seconds", "mib_per_s",
                                 "bytes_transferred", "resumed", "refetched")}
    info.update(source=plan.kind, adapter_dir=str(dest))
    return Fetched([(dest / f["name"], f["sha256"]) for f in meta["files"] or []], dest / METADATA, info, meta)
