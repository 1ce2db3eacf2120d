"""Temporaries: what a run may drop once later stages no longer need it, and `loradeploy clean`.

One set of rules for both: merged HF folders (unless merge.save_merged_hf), F16 GGUFs (unless
quantization.keep_f16, or a quantized format of the same name is served from them, or the model is
in adapter mode, where the F16 base is shared), and — for
`clean` only — partial files left by killed runs. Never a live or backed-up model.

Partial files (fsutil.TMP_MARK) carry their writer's pid: one whose writer is dead was left by a
killed run (``kill -9`` leaves a 7B run's 15 GB), and the next run of that model removes it before
it starts (``remove_stale``); one whose writer lives belongs to a run in progress and is never touched.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import Config
from .fsutil import TMP_MARK, dir_size, remove_path
from .paths import ModelPaths
from .state import RunRecord

_WRITER = re.compile(r"\.(\d+)" + re.escape(TMP_MARK) + "$")


@dataclass(frozen=True)
class Temporary:
    path: Path
    what: str
    stage: Optional[str]      # the stage whose record lists it (marked "cleaned" once removed)


def temporaries(cfg: Config, rec: RunRecord, *, after_run: bool = False) -> list[Temporary]:
    """The model's temporaries; ``after_run`` keeps those a finished downstream stage has not yet
    proven it no longer needs (its own outputs missing or changed)."""
    work = Path(cfg.pipeline.work_dir) / rec.model
    out: list[Temporary] = []
    if not cfg.merge.save_merged_hf and (not after_run or (rec.finished("convert") and rec.intact("convert"))):
        merged = [Path(a.path) for a in rec.artifacts("merge", "merged_hf")] or [work / "merged"]
        out += [Temporary(p, "merged HF folder", "merge") for p in merged if p.exists()]
    # adapter mode: the F16 base is shared by every adapter on it (and their verify runs): kept
    shared = rec.model in cfg.models and cfg.mode_for(rec.model) == "adapter"
    if not cfg.quantization.keep_f16 and not shared and (not after_run or (rec.finished("quantize") and rec.intact("quantize"))):
        served = {a.format for a in rec.artifacts("quantize")}
        out += [Temporary(Path(a.path), "converted GGUF", "convert") for a in rec.artifacts("convert", "gguf")
                if Path(a.path).exists() and a.format not in served]
    if not after_run:
        out += [Temporary(p, "partial file from an interrupted run", None) for p in stale_partials(work)]
    keep = {Path(cfg.deployment.models_dir).resolve()}
    if cfg.deployment.backups_dir:
        keep.add(Path(cfg.deployment.backups_dir).resolve())
    return [t for t in out if not any(t.path.resolve() == k or k in t.path.resolve().parents for k in keep)]


def writer_alive(path: Path) -> bool:
    """Whether the process named in a partial file's name (``.<name>.<pid>`` + TMP_MARK) still runs.
    This process counts as alive (its own writes); a name without a pid has no live writer."""
    m = _WRITER.search(Path(path).name)
    if m is None:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):   # no such process (or a pid no system can have)
        return False
    except PermissionError:                       # another user's process
        return True
    return True


def stale_partials(folder: Path) -> list[Path]:
    """Partial files and folders under ``folder`` whose writer is dead (outermost ones only)."""
    if not Path(folder).exists():
        return []
    out: list[Path] = []
    for p in sorted(Path(folder).rglob(f"*{TMP_MARK}")):
        if not any(q in p.parents for q in out) and not writer_alive(p):
            out.append(p)
    return out


def remove_stale(cfg: Config, model: str) -> list[dict]:
    """Before a run of ``model`` (its lock held): delete what killed runs of it left in its work folder,
    and in its shared base folder in adapter mode; live writers' files stay."""
    paths = ModelPaths.of(cfg, model)
    out = []
    for folder in filter(None, (paths.work, paths.shared_base)):
        for p in stale_partials(folder):
            out.append({"path": str(p), "size": dir_size(p), "what": "partial file from a killed run"})
            remove_path(p)
    return out


def remove(rec: RunRecord, items: list[Temporary]) -> list[dict]:
    """Delete ``items``; the stages whose outputs went are marked cleaned (rebuilt when needed again)."""
    out = []
    for t in items:
        out.append({"path": str(t.path), "size": dir_size(t.path) if t.path.exists() else 0, "what": t.what})
        remove_path(t.path)
        if t.stage and rec.stage(t.stage):
            rec.stage(t.stage)["cleaned"] = True
    if items:
        rec.save()
    return out


def clean(cfg: Config, *, dry_run: bool = False) -> list[dict]:
    """`loradeploy clean`: every model's temporaries, with sizes; ``dry_run`` only lists them."""
    out = []
    for name in cfg.models:
        rec = RunRecord.load(cfg.pipeline.state_dir, name)
        items = temporaries(cfg, rec)
        if dry_run:
            out += [{"path": str(t.path), "size": dir_size(t.path), "what": t.what} for t in items]
        else:
            out += remove(rec, items)
    return out + _tensor_cache(cfg, dry_run)


def _tensor_cache(cfg: Config, dry_run: bool) -> list[dict]:
    from .quantize import ENGINE_VERSION
    from .quantize.cache import clean as clean_cache

    return clean_cache(cfg.pipeline.state_dir, int(cfg.performance.tensor_cache_gb * 2**30), ENGINE_VERSION,
                       dry_run=dry_run)
