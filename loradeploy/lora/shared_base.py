"""Adapter mode's shared base: its GGUFs (F16 and each quant) are made once per base, whatever the
number of adapters on it. The first model's convert or quantize does the work under the folder's
lock and records what it wrote, keyed by the stage's inputs; the next model with the same inputs
finds the record, checks the files are still the recorded bytes (size and mtime, sha256 on a
mismatch) and takes them as its own artifacts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..fsutil import atomic_write_text, exclusive_lock, sha256_file


def locked(folder: Path):
    """One model at a time makes a base's files (other processes and threads wait)."""
    return exclusive_lock(Path(folder) / ".lock")


def _memo(folder: Path, stage: str, key: str) -> Path:
    return folder / f"{stage}-{key[:24]}.json"


def _intact(f: dict) -> bool:
    p = Path(f["path"])
    try:
        st = p.stat()
    except OSError:
        return False
    if st.st_size == f["size"] and st.st_mtime_ns == f["mtime_ns"]:
        return True
    return st.st_size == f["size"] and sha256_file(p) == f["sha256"]


def recall(folder: Path, stage: str, key: str) -> Optional[dict]:
    """What an earlier model's stage recorded for the same inputs: {files: [{path, sha256, kind,
    format}], info, model}; None when absent or when a file changed since."""
    try:
        data = json.loads(_memo(folder, stage, key).read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and _intact(f) for f in files):
        return None
    return data


def remember(folder: Path, stage: str, key: str, files: list[dict], info: dict, model: str) -> None:
    """Record ``files`` ([{path, sha256, kind, format}]) as this stage's result for ``key``."""
    out = []
    for f in files:
        st = Path(f["path"]).stat()
        out.append({**f, "path": str(f["path"]), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    atomic_write_text(_memo(folder, stage, key), json.dumps({"files": out, "info": info, "model": model}, indent=2))


def once(folder: Path, stage: str, inputs: dict, model: str, make, result_cls, log):
    """``make()`` (a StageResult) unless an earlier model on this base already made it with the same
    ``inputs``: then that result (``result_cls(artifacts, info)``), its files checked, as this model's."""
    from ..state import Artifact, inputs_hash

    key = inputs_hash(inputs)
    with locked(folder):
        hit = recall(folder, stage, key)
        if hit:
            log.info("%s: the shared base's files were made by model %s; reused", stage, hit["model"])
            arts = [Artifact.of(Path(f["path"]), f["kind"], f["format"], sha256=f["sha256"]) for f in hit["files"]]
            return result_cls(arts, {**hit["info"], "base_from": hit["model"]})
        res = make()
        remember(folder, stage, key, [{"path": a.path, "sha256": a.sha256, "kind": a.kind, "format": a.format}
                                      for a in res.artifacts], res.info, model)
        return res
